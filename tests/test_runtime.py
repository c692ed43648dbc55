"""Process settings: XLA:CPU flags appended once (never over the user's), the persistent compilation cache."""
import jax
import pytest

from gptjax import runtime
from gptjax.cpu import flags as cpu_flags


@pytest.fixture
def restore_cache_config(tmp_path):
    with runtime.compilation_cache_at(tmp_path / "fixture-cache"):  # the process's settings come back after
        yield


def test_cpu_flags_added_once_and_never_over_the_users(monkeypatch):
    monkeypatch.setattr(cpu_flags, "_backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("GPTJAX_NO_XLA_FLAGS", raising=False)
    assert cpu_flags.set_cpu_flags() == list(cpu_flags.CPU_XLA_FLAGS)
    flags = cpu_flags.os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_force_host_platform_device_count=2 ") and cpu_flags.CPU_XLA_FLAGS[0] in flags
    assert cpu_flags.set_cpu_flags() == [] and cpu_flags.os.environ["XLA_FLAGS"] == flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")  # the user's choice wins
    assert cpu_flags.set_cpu_flags() == []
    monkeypatch.setenv("GPTJAX_NO_XLA_FLAGS", "1")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cpu_flags.set_cpu_flags() == []


def test_cpu_flags_warn_once_jax_has_started(monkeypatch):
    monkeypatch.setattr(cpu_flags, "_backend_started", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("GPTJAX_NO_XLA_FLAGS", raising=False)
    with pytest.warns(UserWarning, match="before the first JAX computation"):
        assert cpu_flags.set_cpu_flags() == []


def test_compilation_cache_dir(tmp_path, monkeypatch, restore_cache_config):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GPTJAX_CACHE_DIR", raising=False)
    monkeypatch.delenv("GPTJAX_CACHE", raising=False)
    assert runtime.default_cache_dir() == tmp_path / "xdg" / "gptjax" / "jax"
    path = runtime.enable_compilation_cache()
    assert path == tmp_path / "xdg" / "gptjax" / "jax" and path.is_dir()
    assert jax.config.values["jax_compilation_cache_dir"] == str(path)
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(5.0)).block_until_ready()  # small programs are not written...
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.enable_compilation_cache() == tmp_path / "mine"
    monkeypatch.setenv("GPTJAX_CACHE_DIR", "")
    assert runtime.enable_compilation_cache() is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="GPTJAX_CACHE_DIR"):
        assert runtime.enable_compilation_cache(blocked / "sub") is None


def test_compilation_cache_at_gives_the_process_its_settings_back(tmp_path):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: jax.config.values[k] for k in keys}
    with runtime.compilation_cache_at(tmp_path / "cc", min_compile_time_s=0.0) as path:
        assert path == tmp_path / "cc" and path.is_dir()
        assert jax.config.values["jax_compilation_cache_dir"] == str(path)
        assert jax.config.values["jax_persistent_cache_min_compile_time_secs"] == 0.0
    assert {k: jax.config.values[k] for k in keys} == before


def test_setup_sets_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(cpu_flags, "_backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("GPTJAX_NO_XLA_FLAGS", raising=False)
    assert runtime.setup(compilation_cache=False) == {"xla_flags_added": list(cpu_flags.CPU_XLA_FLAGS),
                                                      "compilation_cache_dir": None}
