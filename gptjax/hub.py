"""GPT-2 weights from the Hugging Face hub: the four OpenAI presets or any GPT-2-architecture repo id,
from huggingface_hub's cache (HF_HOME / HF_HUB_CACHE) without network when they are there, else
downloaded; offline, one quick error naming HF_HUB_OFFLINE=1 and the local-path option."""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from gptjax import runs
from gptjax.config import ALIASES, PRESETS
from gptjax.tokenizer import is_offline

HUB_REPOS: dict[str, str] = {"gpt2-small": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
_PRESET_ALIASES = {
    **{k.lower(): v for k, v in ALIASES.items()},
    **{f"gpt2-{k.lower()}": v for k, v in ALIASES.items()},  # gpt2-124m
    **{p: p for p in PRESETS},
    "gpt2": "gpt2-small",
    **{repo: p for p, repo in HUB_REPOS.items()},
}
LOAD_HINT = ("pass a local directory with config.json + model.safetensors instead: --model /path/to/dir "
             "(Python: load_gpt2('/path/to/dir'))")
DOWNLOAD_HINT = ("copy config.json + model.safetensors into a directory and pass that directory as --model to the "
                 "other commands (generate, export, finetune-...)")
# One HEAD request before downloading: a machine without network fails in it, not in the hub client's
# retries (their backoff sleeps add up to ~25 s). HF_HUB_ETAG_TIMEOUT, when set, replaces it.
_PROBE_TIMEOUT_S = 3.0
_GPT2_ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}
TORCH_SUFFIXES = (".pth", ".pt", ".bin")  # PyTorch state dicts (the book's model.pth)


def resolve_preset(name: str) -> str | None:
    """'gpt2', '124M', 'gpt2-small', 'openai-community/gpt2' ... -> 'gpt2-small'; None if not a preset."""
    return _PRESET_ALIASES.get(str(name).strip().lower())


def hub_repo(spec: str | os.PathLike) -> str | None:
    """The Hugging Face hub repo `spec` names (a preset's openai-community repo, or any 'owner/name' that is
    not a local path); None if it names none."""
    text = str(spec).strip()
    if (preset := resolve_preset(text)) is not None:
        return HUB_REPOS[preset]
    if (re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text) and not text.endswith((".safetensors", ".json") + TORCH_SUFFIXES)
            and not Path(text).exists()):
        return text
    return None


def check_gpt2_architecture(d: dict[str, Any], where: str) -> None:
    """A Hugging Face config.json `d` of a GPT-2-architecture model, or one ValueError naming what it is."""
    model_type, archs = d.get("model_type", "gpt2"), d.get("architectures") or []
    if model_type != "gpt2" or not set(archs) <= _GPT2_ARCHITECTURES:
        raise ValueError(f"{where}: model_type {model_type!r} (architectures {archs}): only GPT-2-architecture "
                         f"models load in gptjax (model_type 'gpt2': GPT2LMHeadModel or GPT2Model)")


def first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def download_gpt2(spec: str, cache_dir: str | os.PathLike | None = None, *, local_hint: str = LOAD_HINT) -> Path:
    """The directory of a hub model's config.json + safetensors weights: a preset or any GPT-2-architecture
    'owner/name' repo. Taken from the Hugging Face cache without network when it is there (`cache_dir`,
    default huggingface_hub's: HF_HOME / HF_HUB_CACHE), else downloaded into it. `local_hint` ends the
    offline error: what to do instead."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = hub_repo(spec)
    if repo is None:
        raise ValueError(f"{spec!r} is neither a GPT-2 preset ({', '.join(HUB_REPOS)}, 'gpt2', '124M'...) nor a "
                         f"Hugging Face hub repo id (owner/name); or {local_hint}")
    cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None

    def fetch(local: bool) -> Path:  # a missing file (in the cache, when local) raises EntryNotFoundError
        def get(name: str) -> Path:
            return Path(hf_hub_download(repo, name, cache_dir=cache, local_files_only=local))

        config = get("config.json")
        check_gpt2_architecture(runs.read_json_object(config, "delete it from the cache to download it again"),
                                 f"{repo}/config.json")
        try:
            get("model.safetensors")
        except EntryNotFoundError:
            index = get("model.safetensors.index.json")
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                get(shard)
        return config.parent

    with contextlib.suppress(EntryNotFoundError):
        return fetch(local=True)
    where = f"not in the Hugging Face cache {cache or constants.HF_HUB_CACHE}" + \
        ("" if resolve_preset(spec) else ", nor a local path")
    if is_offline("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        raise ConnectionError(f"{repo} is {where}, and HF_HUB_OFFLINE=1 (or GPTJAX_OFFLINE) forbids downloading it: "
                              f"{local_hint}")
    timeout = constants.HF_HUB_ETAG_TIMEOUT if os.environ.get("HF_HUB_ETAG_TIMEOUT") else _PROBE_TIMEOUT_S
    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json"), timeout=timeout)  # one request, no retries
        return fetch(local=False)
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{spec!r} is no local path, and the Hugging Face hub has no model {repo} (or it is "
                                f"private or gated: log in with `hf auth login`)") from e
    except EntryNotFoundError as e:
        if not isinstance(e, LocalEntryNotFoundError):  # the hub answered: the file is not there
            raise FileNotFoundError(f"the hub repo {repo} lacks config.json or safetensors weights (model.safetensors "
                                    f"or model.safetensors.index.json), which gptjax reads ({first_line(e)})") from e
        why = e
    except ValueError:
        raise
    except Exception as e:  # no network, DNS, proxy, TLS, timeouts
        why = e
    raise ConnectionError(f"could not download {repo} from the Hugging Face hub ({first_line(why)}), and it is "
                          f"{where}. Without network, set HF_HUB_OFFLINE=1 (no hub requests at all) and {local_hint}"
                          ) from why
