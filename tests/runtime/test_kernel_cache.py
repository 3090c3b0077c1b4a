"""The on-disk kernel cache: keys, atomic entries, reuse across processes, corrupt entries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnopt.codegen.triton_attention import AttentionKernelConfig, render_attention_kernel
from attnopt.codegen.triton_linear import LinearKernelConfig, render_linear_kernel
from attnopt.ir.linear_attention import linear_attention_reference, make_feature_map
from attnopt.runtime.triton.cache import (
    KernelCache,
    default_cache_dir,
    kernel_cache_key,
    validate_key,
)
from attnopt.runtime.triton.loader import triton_interpreter_ready
from attnopt.tolerances import assert_close

REPO = Path(__file__).resolve().parents[2]
SOURCE = "VALUE = 3\n"
KEY = kernel_cache_key(SOURCE, "{}", "3.x", "interpreter")


def test_key_depends_on_every_part() -> None:
    keys = {
        kernel_cache_key(SOURCE, "{}", "3.x", "interpreter"),
        kernel_cache_key(SOURCE + "\n", "{}", "3.x", "interpreter"),
        kernel_cache_key(SOURCE, '{"a": 1}', "3.x", "interpreter"),
        kernel_cache_key(SOURCE, "{}", "3.y", "interpreter"),
        kernel_cache_key(SOURCE, "{}", "3.x", "cuda-sm90"),
    }
    assert len(keys) == 5
    assert all(validate_key(key) == key for key in keys)


@pytest.mark.parametrize("key", ["../x", "../" + "a" * 61, "A" * 64, "a" * 63, "a" * 63 + "/", ""])
def test_keys_that_could_escape_the_directory_raise(key: str, tmp_path: Path) -> None:
    cache = KernelCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="invalid kernel cache key"):
        cache.get_or_create(key, SOURCE, {})
    with pytest.raises(ValueError):
        cache.lookup(key)
    assert not (tmp_path / "cache").exists()


def test_miss_then_hit_and_metadata(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    path = cache.get_or_create(KEY, SOURCE, {"kernel": "demo"})
    assert (cache.last_outcome, cache.stats.misses) == ("miss", 1)
    assert path == tmp_path / f"{KEY}.py" and path.read_text() == SOURCE
    metadata = json.loads((tmp_path / f"{KEY}.json").read_text())
    assert metadata["key"] == KEY and metadata["kernel"] == "demo"
    assert metadata["source_sha256"] == hashlib.sha256(SOURCE.encode()).hexdigest()
    assert cache.get_or_create(KEY, SOURCE, {"kernel": "demo"}) == path
    assert (cache.last_outcome, cache.stats.hits) == ("hit", 1)
    # Writes go through temporary files that are renamed into place: none are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY}.json", f"{KEY}.py"]


@pytest.mark.parametrize("damage", ["source", "json", "foreign", "missing-json"])
def test_corrupt_or_foreign_entry_is_rebuilt(damage: str, tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    path = cache.get_or_create(KEY, SOURCE, {})
    meta_path = tmp_path / f"{KEY}.json"
    if damage == "source":
        path.write_text("raise RuntimeError('tampered')\n")
    elif damage == "json":
        meta_path.write_text("{not json")
    elif damage == "foreign":
        metadata = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**metadata, "key": "0" * 64}))
    else:
        meta_path.unlink()
    assert cache.lookup(KEY) is None
    module = cache.load_module(KEY, SOURCE, {})
    assert cache.last_outcome == "rebuilt" and cache.stats.rebuilds == 1
    assert module.VALUE == 3 and Path(module.__file__) == path
    assert cache.lookup(KEY) == path


def test_default_directory_comes_from_one_env_var(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path / "override"))
    assert default_cache_dir() == tmp_path / "override"
    assert KernelCache().directory == tmp_path / "override"
    monkeypatch.delenv("ATTNOPT_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "attnopt"
    assert KernelCache(tmp_path).directory == tmp_path


_RUN_KERNEL = textwrap.dedent(
    """
    import json, sys
    import torch
    from attnopt.ir.attention_reference import attention_reference
    from attnopt.runtime.triton.cache import KernelCache
    from attnopt.runtime.triton.launch import AttentionCall, triton_attention

    cache = KernelCache(sys.argv[1])
    q, k, v = (torch.randn(1, 2, 9, 32) for _ in range(3))
    out = triton_attention(AttentionCall(q, k, v, causal=True), interpret=True, cache=cache)
    error = (out - attention_reference(q, k, v, causal=True)).abs().max().item()
    print(json.dumps({"outcome": cache.last_outcome, "hits": cache.stats.hits,
                      "misses": cache.stats.misses, "error": error}))
    """
)


def _run_in_new_process(cache_dir: Path) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("ATTNOPT_CACHE_DIR", None)
    command = [sys.executable, "-c", _RUN_KERNEL, str(cache_dir)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_reuses_the_cache_and_corruption_is_repaired(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    first = _run_in_new_process(tmp_path)
    assert (first["outcome"], first["misses"]) == ("miss", 1) and first["error"] < 1e-5
    (source_path,) = tmp_path.glob("*.py")
    before = source_path.stat()

    second = _run_in_new_process(tmp_path)
    assert (second["outcome"], second["hits"], second["misses"]) == ("hit", 1, 0)
    after = source_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # A damaged entry is detected (its hash no longer matches) and written again.
    source_path.write_text("raise RuntimeError('tampered')\n")
    config = AttentionKernelConfig(head_dim=32, head_dim_v=32, causal=True, dtype="float32")
    cache = KernelCache(tmp_path)
    assert cache.lookup(source_path.stem) is None
    cache.get_or_create(source_path.stem, render_attention_kernel(config).source, {})
    assert cache.last_outcome == "rebuilt"
    assert cache.lookup(source_path.stem) == source_path
    assert "@triton.jit" in source_path.read_text()


@pytest.mark.skipif(
    not triton_interpreter_ready(), reason="triton imported without TRITON_INTERPRET"
)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_kernels_load_through_the_cache_directory(
    causal: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The linear kernels are stored where ATTNOPT_CACHE_DIR says, like the attention kernels."""
    from attnopt.runtime.triton.linear import triton_linear_attention

    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=generator) for _ in range(3))
    config = LinearKernelConfig(feature_map="elu", causal=causal)
    out = triton_linear_attention(q, k, v, config, interpret=True)
    expected = linear_attention_reference(q, k, v, make_feature_map("elu", 16), causal=causal)
    assert_close(out, expected)
    (source_path,) = tmp_path.glob("*.py")
    assert source_path.read_text() == render_linear_kernel(config)
    metadata = json.loads(source_path.with_suffix(".json").read_text())
    assert metadata["kernel"] == config.kernel_name and metadata["device"] == "interpreter"
    assert KernelCache(tmp_path).lookup(source_path.stem) == source_path
