"""The book's chapter-7 evaluation over files: answer a set of instructions with a model (`respond_file`),
then score the answers (`judge_file`: exact match, ROUGE-L, the reference loss, an LLM judge)."""
from __future__ import annotations

from pathlib import Path

from gptjax import runs
from gptjax.model_io import load_model, load_run_config
from gptjax.generate import load_for_decoding
from gptjax.tasks.instruct import format_table, generate_responses, offline_report, save_responses
from gptjax.tasks.instruct_data import load_instruction_data, load_json_records, split_data
from gptjax.tasks.judge import DEFAULT_JUDGE, DEFAULT_URL, generate_model_scores
from gptjax.tokenizer import get_gpt2_tokenizer


def trained_test_split(model: str) -> list[dict]:
    """The test split of the data a finetune-instruct/dpo run was trained on (the book's for other models)."""
    source = None
    if (Path(model) / "config.json").is_file():
        meta = load_run_config(model)[1]
        source = next((meta[t].get("data") for t in ("instruct", "dpo") if isinstance(meta.get(t), dict)), None)
    return split_data(load_instruction_data(source))["test"]


def respond_file(model: str, data: str | None = None, out: str | Path | None = None, *, style: str = "alpaca",
                 limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 256,
                 weight_dtype: str | None = None, bpe_dir: str | None = None, progress: bool = True,
                 overwrite: bool = False, decoding: dict | None = None, **sampling) -> dict:
    """Answer the records of `data` (default: the test split of the run's data) with `model`, saved as the book's
    instruction-data-with-response.json at `out` (default MODEL/responses.json); with reference outputs, prints
    and returns the offline scores. `decoding`: load_for_decoding's execution options."""
    out = Path(out) if out else (Path(model) / "responses.json" if Path(model).is_dir() else Path("responses.json"))
    runs.check_output(out, [data, model], overwrite=overwrite)
    records = (load_instruction_data(data) if data else trained_test_split(model))[:limit or None]
    params, cfg, opts = load_for_decoding(model, weight_dtype, **(decoding or {}))
    tok = get_gpt2_tokenizer(bpe_dir)
    responses = generate_responses(params, cfg, records, tok, style=style, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress, opts=opts, **sampling)
    save_responses(records, responses, out)
    print(f"{len(records)} responses ({style} prompts) saved to {out}")
    row = {}
    if all("output" in r for r in records):
        row = offline_report(records, responses, params=params, cfg=cfg, tokenizer=tok, style=style, name=str(model),
                             opts=opts)
        print(format_table([row]))
    return {"out": out, "responses": responses, "offline": row}


def judge_file(data: str, out: str | Path | None = None, *, key: str = "model_response", model: str | None = None,
               judge_model: str = DEFAULT_JUDGE, url: str = DEFAULT_URL, offline: bool = False,
               style: str = "alpaca", limit: int | None = None, timeout: float = 60.0, bpe_dir: str | None = None,
               progress: bool = True, overwrite: bool = False) -> dict:
    """Score the responses under `key` in `data`: exact match and ROUGE-L against the references, the reference
    answers' loss under `model` (a gptjax model, optional), and unless `offline` an LLM judge's 0-100 scores;
    printed, and saved to `out` (default DATA-scores.json)."""
    out = Path(out) if out else Path(data).with_name(Path(data).stem + "-scores.json")
    runs.check_output(out, [data, model], overwrite=overwrite)
    records = load_json_records(data, keys=("instruction", "output", key))[:limit or None]
    responses = [r[key] for r in records]
    if model:
        params, cfg = load_model(model)
        row = offline_report(records, responses, params=params, cfg=cfg, tokenizer=get_gpt2_tokenizer(bpe_dir),
                             style=style, name=str(model))
    else:
        row = offline_report(records, responses, name=Path(data).name)
    result = {"offline": row}
    if not offline:
        scores = generate_model_scores(records, key, judge_model, url, style=style, progress=progress,
                                       timeout=timeout)
        row["judge_score"] = scores["mean"]
        result["judge"] = scores
        print(f"Number of scores: {scores['n_scored']} of {len(records)} ({scores['n_unparsable']} replies were "
              f"not an integer and {scores['n_out_of_range']} outside 0-100; both left out)\n"
              f"Average score: {scores['mean']:.2f}")
    print(format_table([row]))
    runs.write_json_atomic(out, result, indent=1)
    print(f"scores saved to {out}")
    return result
