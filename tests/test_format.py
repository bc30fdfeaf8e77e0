"""The compressed format: packed bitmask, dense/CSR execution, save → load in a fresh process
(capllm and plain transformers ``trust_remote_code``), integrity checks, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import capllm
from capllm.cli.main import main
from capllm.engine.context import CompressionContext
from capllm.errors import CapllmError
from capllm.format.bitmask import csr_from_bitmask, pack_bitmask, packed_bytes, unpack_bitmask
from capllm.format.execution import AUTO_CSR_MAX_DENSITY, choose_layout
from capllm.format.modules import LowRankSparseLinear
from capllm.methods.base import CompressedWeight, get_method
from conftest import tiny_model, random_calibration

SRC = Path(capllm.__file__).resolve().parents[1]
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


# --- packed bitmask ---------------------------------------------------------------------------


def test_bitmask_bytes_are_the_documented_layout():
    S = torch.zeros(2, 10)
    S[0, 0], S[0, 9], S[1, 3], S[1, 8] = 1.0, 2.0, 3.0, 4.0
    values, bitmask = pack_bitmask(S)
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0]  # row-major order
    assert bitmask.dtype == torch.uint8 and bitmask.tolist() == [[0b00000001, 0b00000010], [0b00001000, 0b00000001]]
    assert torch.equal(unpack_bitmask(values, bitmask, (2, 10)), S)


@pytest.mark.parametrize("shape, density", [((7, 13), 0.5), ((16, 64), 0.05), ((5, 8), 1.0), ((3, 9), 0.0)])
def test_bitmask_round_trip_and_csr(shape, density):
    g = torch.Generator().manual_seed(0)
    S = torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)
    values, bitmask = pack_bitmask(S)
    assert values.numel() == int((S != 0).sum()) and bitmask.shape == (shape[0], (shape[1] + 7) // 8)
    assert torch.equal(unpack_bitmask(values, bitmask, shape), S)
    assert torch.equal(csr_from_bitmask(values, bitmask, shape).to_dense(), S)
    assert packed_bytes(*shape, values.numel(), 4) == values.numel() * 4 + bitmask.numel()


def test_corrupt_bitmask_is_refused():
    values, bitmask = pack_bitmask(torch.eye(4))
    bitmask[0, 0] ^= 0b10
    with pytest.raises(ValueError, match="corrupt"):
        unpack_bitmask(values, bitmask, (4, 4))


# --- LowRankSparseLinear execution ------------------------------------------------------------


def _factors(m=24, n=40, r=3, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)
    S = torch.randn(m, n, generator=g) * (torch.rand(m, n, generator=g) < density)
    return U, V, S, torch.randn(m, generator=g)


@pytest.mark.parametrize("parts", ["lowrank+sparse", "lowrank", "sparse"])
def test_dense_and_csr_paths_compute_the_same_function(parts):
    U, V, S, b = _factors()
    if parts == "lowrank":
        S = None
    if parts == "sparse":
        U = V = None
    mod = LowRankSparseLinear.from_factors(U, V, S, b)
    x = torch.randn(2, 5, 40, dtype=torch.float64).float()
    W = (U @ V.t() if U is not None else 0) + (S if S is not None else 0)
    expect = (x.double() @ torch.as_tensor(W).double().t() + b.double()).float()
    y_dense = mod(x)
    assert torch.allclose(y_dense, expect, atol=1e-4)
    mod.set_sparse_layout("csr")
    want = {"lowrank+sparse": "lowrank+csr", "lowrank": "lowrank", "sparse": "csr"}[parts]
    assert mod.execution == want
    if S is not None:
        assert mod.S.layout == torch.sparse_csr and mod.S.crow_indices().dtype == torch.int32 and mod.nnz == int((S != 0).sum())
    assert torch.allclose(mod(x), expect, atol=1e-4)
    assert torch.allclose(mod.weight, torch.as_tensor(W) + 0.0, atol=1e-5)
    mod.set_sparse_layout("dense")
    assert torch.equal(mod(x), y_dense)


def test_rank_zero_factors_mean_no_low_rank_part():
    U, V, S, b = _factors()
    mod = LowRankSparseLinear.from_factors(U[:, :0], V[:, :0], S, b)
    assert mod.rank == 0 and mod.U is None and mod.execution == "dense"
    x = torch.randn(3, 40)
    assert torch.allclose(mod(x), x @ S.t() + b, atol=1e-5)
    with pytest.raises(ValueError):
        LowRankSparseLinear.from_factors(None, None, None, b)


def test_auto_layout_rule_and_probe(monkeypatch):
    """The dense / CSR rule, for a device with no packed kernel (the kernel's probe: test_kernels)."""
    import capllm.format.execution as execution

    monkeypatch.setattr(execution, "kernel_backend", lambda device: None)
    U, V, S, b = _factors(64, 64, density=0.5)
    layout, why = choose_layout(S, "auto")
    assert layout == "dense" and "dense_ms" not in why and why["density"] > AUTO_CSR_MAX_DENSITY
    assert choose_layout(S, "csr")[0] == "csr"
    very_sparse = S * (torch.rand_like(S) < 0.05)
    layout, why = choose_layout(very_sparse, "auto")
    assert layout in ("dense", "csr") and why["dense_ms"] > 0 and why["csr_ms"] > 0  # the probe ran
    assert (layout == "csr") == (why["csr_ms"] < 0.9 * why["dense_ms"])


# --- round trips ------------------------------------------------------------------------------


def _ctx(model):
    return CompressionContext(model, random_calibration(), torch.device("cpu"), progress=False)


def _svd_factors(W, r):
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    return u[:, :r] * s[:r].sqrt(), vh[:r].t() * s[:r].sqrt()


# Registered methods run as the CLI runs them (tiny option settings where the defaults are slow).
REGISTERED = {"wanda": {}, "magnitude": {}, "sparsegpt": {}, "svd": {}, "oats": {"iters": 4},
              "cap": {"steps": "1", "samples": "2", "policy_windows": "2", "rpca_max_iter": "60", "rpca_tol": "1e-5"}}
LOW_RANK_ONLY = ("lowrank", "svd")
SPARSE_ONLY = ("wanda", "magnitude", "sparsegpt")


def _compress(arch: str, family: str):
    """A tiny model compressed by one method (family): a registered method, or ``lowrank`` / ``mixed``
    built here from a truncated SVD (plus the magnitude-pruned residual), through the engine's ``apply``."""
    model = tiny_model(arch)
    ctx = _ctx(model)
    if family in REGISTERED:
        get_method(family)(0.5, None, REGISTERED[family]).compress_model(ctx)
        return model, ctx
    for h in ctx.linears:  # low-rank results built here (the low-rank methods live elsewhere)
        W = h.weight_copy()
        m, n = W.shape
        r = max(1, int(0.5 * m * n / (m + n)) // (4 if family == "mixed" else 1))
        U, V = _svd_factors(W, r)
        S = None
        if family == "mixed":  # magnitude-prune the residual to the 50 % budget
            R = W - U @ V.t()
            keep = int(0.5 * m * n) - r * (m + n)
            idx = R.abs().view(-1).topk(keep).indices
            S = torch.zeros(m * n)
            S[idx] = R.view(-1)[idx]
            S = S.view(m, n)
        ctx.apply(h, CompressedWeight(S=S, U=U, V=V))
    return model, ctx


# Every method family: sparse only (wanda, magnitude, sparsegpt), low-rank only (svd, lowrank),
# low-rank + sparse (oats, cap — whose global allocation may also leave whole layers empty — mixed).
CASES = [("llama", "wanda"), ("qwen2", "magnitude"), ("llama", "lowrank"), ("qwen2", "mixed"), ("gpt2", "wanda"), ("gpt2", "mixed"), ("opt", "mixed"),
         ("opt", "sparsegpt"), ("llama", "svd"), ("gpt2", "oats"), ("llama", "cap")]

_FRESH = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from safetensors.torch import save_file
    ids = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for d in sys.argv[2:]:
        import capllm
        from transformers import AutoModelForCausalLM
        m, _ = capllm.load_compressed(d)
        with torch.no_grad():
            out[d.split("/")[-1] + ".capllm"] = m(ids).logits.contiguous()
        r = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
        with torch.no_grad():
            out[d.split("/")[-1] + ".transformers"] = r(ids).logits.contiguous()
        assert type(r).__name__.startswith("Capllm"), type(r)
    save_file(out, sys.argv[2].rsplit("/", 1)[0] + "/fresh.safetensors")
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case compressed, saved, then loaded by ONE fresh Python process (both loaders)."""
    root = tmp_path_factory.mktemp("saved")
    cases = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only costs on a shared 2-core machine
    mp = pytest.MonkeyPatch()  # a module fixture runs outside the per-test cache isolation
    mp.setenv("CAPLLM_CACHE", str(root / "capllm-cache"))
    try:
        for arch, family in CASES:
            model, ctx = _compress(arch, family)
            with torch.no_grad():
                logits = model(IDS).logits
            d = root / f"{arch}-{family}"
            storage = capllm.save_compressed(model, d)
            cases[(arch, family)] = {"dir": d, "logits": logits, "storage": storage, "records": dict(ctx.records), "model": model}
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_MODULES_CACHE": str(root / "hf-modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(IDS.tolist()), *[str(c["dir"]) for c in cases.values()]], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    fresh = load_file(str(root / "fresh.safetensors"))
    for (arch, family), c in cases.items():
        c["fresh"] = {k: fresh[f"{arch}-{family}.{k}"] for k in ("capllm", "transformers")}
    return cases


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_round_trip_in_a_fresh_process(saved, case):
    c = saved[case]
    for loader in ("capllm", "transformers"):
        diff = (c["fresh"][loader] - c["logits"]).abs().max().item()
        assert diff <= 1e-5, f"{loader}: max |Δlogits| = {diff}"


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_config_lists_every_compressed_module(saved, case):
    c = saved[case]
    section = json.loads((c["dir"] / "config.json").read_text())["capllm"]
    mods = {m["name"]: m for m in section["modules"]}
    assert set(mods) == set(c["records"])  # every decoder linear was compressed and is listed
    itemsize = 4
    decoder = 0
    for name, rec in c["records"].items():
        m = mods[name]
        assert m["shape"] == list(rec.shape) and m["rank"] == rec.rank and m["dtype"] == "float32"
        assert m["kind"] == ("conv1d" if case[0] == "gpt2" else "linear")
        if case[1] in LOW_RANK_ONLY:
            assert m["sparse_layout"] is None and m["rank"] > 0
        elif case[1] in SPARSE_ONLY or m["nnz"] > 0:
            assert m["sparse_layout"] == "bitmask"
        assert m["nnz"] == rec.nnz  # no exact zeros among the kept weights of a random model
        out_f, in_f = rec.shape
        decoder += rec.rank * (out_f + in_f) * itemsize + m["nnz"] * itemsize + (out_f * ((in_f + 7) // 8) if m["sparse_layout"] else 0)
        decoder += out_f * itemsize if m["bias"] else 0
    st = c["storage"]
    assert st["decoder_bytes"] == decoder
    assert st["decoder_bytes"] <= 0.6 * st["decoder_dense_bytes"]  # 50 %: ≤ 60 % of the dense bytes, index included
    assert set(section["files"]) >= {"model.safetensors", "modeling_capllm.py"}
    on_disk = sum(p.stat().st_size for p in c["dir"].iterdir() if p.is_file())
    assert st["total_bytes"] == on_disk


def test_sparse_only_loads_as_the_architectures_own_modules(saved):
    model, _ = capllm.load_compressed(saved[("gpt2", "wanda")]["dir"], execution="dense")
    from transformers.pytorch_utils import Conv1D

    mod = model.get_submodule("transformer.h.0.attn.c_attn")
    assert type(mod) is Conv1D and mod.capllm_decision["policy"] == "dense"
    desc = capllm.describe_execution(model)
    assert desc["summary"] == {"dense": 8}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, saved[("gpt2", "wanda")]["logits"])


def test_csr_execution_matches(saved, tmp_path):
    c = saved[("qwen2", "mixed")]
    model, _ = capllm.load_compressed(c["dir"], execution="csr")
    assert capllm.describe_execution(model)["summary"] == {"lowrank+csr": 14}
    with torch.no_grad():
        assert (model(IDS).logits - c["logits"]).abs().max() < 1e-4  # only the summation order differs
    again = tmp_path / "resaved"
    capllm.save_compressed(model, again)  # a loaded (CSR) model saves back to the same bytes
    assert (again / "model.safetensors").read_bytes() == (c["dir"] / "model.safetensors").read_bytes()


def test_sharded_save_round_trips(tmp_path, saved):
    c = saved[("qwen2", "mixed")]
    d = tmp_path / "sharded"
    capllm.save_compressed(c["model"], d, max_shard_size=40_000)
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 2 and (d / "model.safetensors.index.json").exists()
    model, _ = capllm.load_compressed(d)
    with torch.no_grad():
        assert (model(IDS).logits - c["logits"]).abs().max() <= 1e-5


def test_save_makes_one_shard_at_a_time(tmp_path, saved, monkeypatch):
    """The writer never holds the whole compressed model: each shard's tensors are made just
    before that shard is written — one ``save_file`` gets that shard's tensors only, and the
    tensors made for a shard (packed values and bitmasks) are freed before the next is made."""
    import gc
    import weakref

    import safetensors.torch

    c = saved[("qwen2", "mixed")]
    own = {p.untyped_storage().data_ptr() for p in c["model"].state_dict().values()}
    calls, alive, made = [], [], []
    real = safetensors.torch.save_file

    def spy(tensors, filename, metadata=None):
        gc.collect()
        alive.append(sum(r() is not None for r in made))  # tensors made for earlier shards
        calls.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        made.extend(weakref.ref(t) for t in tensors.values() if t.untyped_storage().data_ptr() not in own)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    d = tmp_path / "sharded"
    storage = capllm.save_compressed(c["model"], d, max_shard_size=40_000)
    largest = max(t.numel() * t.element_size() for t in c["model"].state_dict().values())
    assert len(calls) > 2 and sum(calls) == storage["tensor_bytes"]
    assert max(calls) <= 40_000 + largest
    assert made and max(alive) == 0
    model, _ = capllm.load_compressed(d)
    with torch.no_grad():
        assert (model(IDS).logits - c["logits"]).abs().max() <= 1e-5


def test_dense_save_is_a_plain_checkpoint(tmp_path, saved):
    from transformers import AutoModelForCausalLM

    c = saved[("gpt2", "mixed")]
    d = tmp_path / "dense"
    st = capllm.format.save_dense(c["model"], d)
    assert "auto_map" not in json.loads((d / "config.json").read_text()) and st["decoder_bytes"] == st["decoder_dense_bytes"]
    plain = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        assert (plain(IDS).logits - c["logits"]).abs().max() < 1e-4  # U Vᵀ + S merged: rounding only


# --- integrity --------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_file_is_a_clear_error(tmp_path, saved):
    d = _copy(saved[("llama", "wanda")]["dir"], tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CapllmError, match="truncated"):
        capllm.load_compressed(d)
    with pytest.raises(CapllmError, match="truncated"):
        capllm.load_model(str(d))
    from transformers import LlamaForCausalLM

    from capllm.format.modeling_capllm import capllm_class

    with pytest.raises(ValueError, match="truncated"):  # the class trust_remote_code loads checks too
        capllm_class(LlamaForCausalLM).from_pretrained(d)


def test_flipped_byte_in_the_data_is_a_clear_error(tmp_path, saved):
    from transformers import Qwen2ForCausalLM

    d = _copy(saved[("qwen2", "mixed")]["dir"], tmp_path / "flip")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    pos = 8 + header + (len(raw) - 8 - header) // 2  # the middle of the data section
    raw[pos] ^= 0x01  # one bit of one weight: the header still parses
    f.write_bytes(bytes(raw))
    with pytest.raises(CapllmError, match="SHA-256"):
        capllm.load_compressed(d)
    from capllm.format.modeling_capllm import capllm_class

    with pytest.raises(ValueError, match="SHA-256"):  # the class trust_remote_code loads checks too
        capllm_class(Qwen2ForCausalLM).from_pretrained(d)


def test_missing_shard_and_bad_config_are_clear_errors(tmp_path, saved):
    d = _copy(saved[("llama", "lowrank")]["dir"], tmp_path / "missing")
    (d / "model.safetensors").unlink()
    with pytest.raises(CapllmError, match="missing"):
        capllm.load_compressed(d)
    d2 = _copy(saved[("llama", "lowrank")]["dir"], tmp_path / "badcfg")
    (d2 / "config.json").write_text('{"capllm": ')
    with pytest.raises(CapllmError, match="not valid JSON"):
        capllm.load_compressed(d2)


def test_config_that_lies_about_a_shape_is_refused(tmp_path, saved):
    d = _copy(saved[("llama", "lowrank")]["dir"], tmp_path / "lie")
    cfg = json.loads((d / "config.json").read_text())
    cfg["capllm"]["modules"][0]["rank"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CapllmError, match="could not load|mis-shaped|do not match"):
        capllm.load_compressed(d)


def test_existing_directory_is_not_overwritten(tmp_path, saved):
    d = tmp_path / "exists"
    d.mkdir()
    with pytest.raises(CapllmError, match="already exists"):
        capllm.save_compressed(saved[("llama", "lowrank")]["model"], d)


# --- CLI --------------------------------------------------------------------------------------


def _cli(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_compress_save_eval_generate(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--calib", str(text_file), "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--quiet", "--no-eval"]
    rc, stdout, err = _cli(["compress", "--model", str(tiny_model_dir), "--method", "wanda", "--ratio", "0.5", "--out", str(out), *common], capsys)
    assert rc == 0, err
    res = json.loads((out / "result.json").read_text())
    st = res["storage"]
    assert st["format"] == "compressed" and st["decoder_bytes"] <= 0.6 * st["decoder_dense_bytes"] and st["index_overhead_bytes"] > 0
    assert json.loads((out / "config.json").read_text())["capllm"]["method"] == "wanda"
    assert (out / "tokenizer.json").exists() and "saved compressed model" in stdout

    rc, stdout, err = _cli(["eval", "--model", str(out), "--dataset", str(text_file), "--seqlen", "64", "--max-windows", "2", "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err
    assert stdout.startswith("perplexity ")

    rc, stdout, err = _cli(["generate", "--model", str(out), "The quick brown", "--max-new-tokens", "6", "--greedy", "--device", "cpu", "--execution", "dense"], capsys)
    assert rc == 0, err
    assert stdout.startswith("The quick brown") and "new tokens" in err and "14 dense" in err
    rc2, stdout2, err2 = _cli(["generate", "--model", str(out), "The quick brown", "--max-new-tokens", "6", "--greedy", "--device", "cpu", "--execution", "kernel"], capsys)
    assert rc2 == 0 and "14 bitmask" in err2, err2
    assert stdout2 == stdout  # greedy, and the packed kernel computes the same function

    dense = tmp_path / "dense"
    rc, _, err = _cli(["compress", "--model", str(tiny_model_dir), "--method", "wanda", "--ratio", "0.5", "--out", str(dense), "--save", "dense", *common], capsys)
    assert rc == 0, err
    assert "capllm" not in json.loads((dense / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    a, _ = capllm.load_model(str(out))
    b = AutoModelForCausalLM.from_pretrained(dense)
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)

    none = tmp_path / "none"
    rc, _, err = _cli(["compress", "--model", str(tiny_model_dir), "--method", "magnitude", "--out", str(none), "--save", "none", *common], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in none.iterdir()) == ["result.json"]


def test_cli_generate_bad_input(tiny_model_dir, capsys):
    rc, _, err = _cli(["generate", "--model", str(tiny_model_dir), "hi", "--max-new-tokens", "0"], capsys)
    assert rc == 2 and "--max-new-tokens" in err


def test_saved_directory_is_readable_by_others(saved):
    from capllm.utils import _umask

    d = saved[("llama", "wanda")]["dir"]
    assert d.stat().st_mode & 0o777 == 0o777 & ~_umask()
    for f in ("model.safetensors", "config.json"):
        assert (d / f).stat().st_mode & 0o777 == 0o666 & ~_umask()
