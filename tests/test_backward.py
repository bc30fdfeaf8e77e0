"""Block-wise backward pass and the architecture-agnostic head, against whole-model autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capllm.engine.backward import BackwardState, DiskCheckpoint, blockwise_output_grad_sq
from capllm.engine.capture import BlockInputs, capture_block_inputs
from capllm.engine.head import Head
from capllm.models.layers import find_decoder_blocks, find_linears

ARCHS = ["llama", "qwen2", "gpt2", "opt", "opt-proj", "gemma3", "gpt_neox"]


def make_model(arch: str, seed: int = 0):
    from conftest import tiny_model

    if arch in ("llama", "qwen2", "gpt2", "opt"):
        return tiny_model(arch, seed=seed)
    import transformers as tf

    if arch == "opt-proj":  # OPT-350m layout: project_in/out, post-norm blocks, no final norm
        cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=False)
    elif arch == "gemma3":  # sliding + full layers, own rotary tables per type, final logit soft-capping
        if not hasattr(tf, "Gemma3TextConfig"):
            pytest.skip("transformers without Gemma 3")
        cfg = tf.Gemma3TextConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            query_pre_attn_scalar=16, max_position_embeddings=256, sliding_window=8, final_logit_softcapping=0.5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def replay_block_inputs(model, windows):
    """Every block's inputs: block 0 from ``capture_block_inputs``, the next ones by running the
    blocks forward. The non-hidden args come from pre-hooks on each block, since some models
    (Gemma 3: sliding vs full attention) give each block its own mask and rotary tables."""
    _, blocks = find_decoder_blocks(model)
    first = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    per_block = [([], []) for _ in blocks]

    def pre(i):
        def fn(mod, args, kwargs):
            kwargs = dict(kwargs)
            if not args:
                kwargs.pop("hidden_states")
            per_block[i][0].append(tuple(args[1:]))
            per_block[i][1].append(kwargs)
        return fn

    hooks = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for w in windows:
            model(w.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    stored, hidden = [], list(first.hidden)
    for i, b in enumerate(blocks):
        inp = BlockInputs(hidden, *per_block[i])
        stored.append(inp)
        outs = [b(x, *a, **k) for x, a, k in zip(inp.hidden, inp.args, inp.kwargs)]
        hidden = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
    return stored, hidden


def autograd_reference(model, windows, entries: bool = False):
    """``collect_output_grad_sq`` semantics by plain autograd through the whole model; with
    ``entries`` also ``{name: Σ_w Σ_t g_ti² x_tj²}`` (``x`` the linear's input), the sums the
    entries' diagonal empirical Fisher is made of."""
    linears = find_linears(model)
    sums = {h.name: torch.zeros(h.shape[0], dtype=torch.float64) for h in linears}
    ent = {h.name: torch.zeros(h.shape, dtype=torch.float64) for h in linears}
    for w in windows:
        outs, ins = {}, {}

        def keep(n, i, o):
            outs[n], ins[n] = o, i[0]  # returns None: the output is left as it is

        hooks = [h.module.register_forward_hook(lambda m, i, o, n=h.name: keep(n, i, o)) for h in linears]
        try:
            logits = model(w.unsqueeze(0), use_cache=False).logits[0, :-1]
        finally:
            for hk in hooks:
                hk.remove()
        loss = F.cross_entropy(logits.float(), w[1:], reduction="sum")
        names = list(outs)
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        for n, g in zip(names, grads):
            g2 = g.double().pow(2).reshape(-1, g.shape[-1])
            sums[n] += g2.sum(0)
            if entries:
                ent[n] += g2.T @ ins[n].detach().double().pow(2).reshape(g2.shape[0], -1)
    model.zero_grad(set_to_none=True)
    count = len(windows) * (windows.shape[1] - 1)
    G = {k: v / count for k, v in sums.items()}
    return (G, ent) if entries else G


def setup(arch):
    from conftest import random_calibration

    model = make_model(arch)
    windows = random_calibration(n=3, L=24).windows
    stored, final = replay_block_inputs(model, windows)
    return model, windows, stored, final


@pytest.mark.parametrize("arch", ARCHS)
def test_head_loss_and_logits_match_the_full_model(arch, one_thread):
    model, windows, _, final = setup(arch)
    head = Head(model, "cpu")
    with torch.no_grad():
        for w, h in zip(windows, final):
            ref = model(w.unsqueeze(0), use_cache=False).logits
            torch.testing.assert_close(head.logits(h, w), ref, rtol=1e-5, atol=1e-5)
            ref_loss = F.cross_entropy(ref[0, :-1].float(), w[1:], reduction="sum")
            torch.testing.assert_close(head.loss(h, w), ref_loss, rtol=1e-5, atol=1e-5 * ref_loss.abs().item())
    _, blocks = find_decoder_blocks(model)
    assert all(type(b).__name__ != "_Passthrough" for b in blocks)  # real blocks restored


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_output_grad_sq_matches_whole_model_autograd(arch, one_thread):
    model, windows, stored, final = setup(arch)
    ref = autograd_reference(model, windows)
    got = blockwise_output_grad_sq(model, lambda i: stored[i], final, windows, "cpu")
    assert set(got) == set(ref) and len(got) == len(find_linears(model))
    for name, G in got.items():
        r = ref[name]
        assert G.dtype == torch.float32 and G.shape == r.shape
        assert r.max() > 0, name
        torch.testing.assert_close(G.double(), r, rtol=1e-4, atol=1e-7 * r.max().item(), msg=name)
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients formed


@pytest.mark.parametrize("arch", ARCHS)
def test_entry_fisher_is_the_diagonal_of_the_empirical_fisher_by_whole_model_autograd(arch, one_thread):
    """``on_entry_stats`` gives, block by block, ``F_ij = Σ_w Σ_t g_ti² x_tj²`` of every linear
    (``g = ∂ℒ/∂y`` by whole-model autograd, ``x`` the linear's input): the per-weight squared
    gradient summed over tokens, not the product of the two means (K-FAC)."""
    model, windows, stored, final = setup(arch)
    linears = find_linears(model)
    _, ref = autograd_reference(model, windows, entries=True)
    seen: dict[int, dict] = {}
    blockwise_output_grad_sq(model, lambda i: stored[i], final, windows, "cpu", on_entry_stats=lambda i, Fb: seen.__setitem__(i, Fb))
    by_block = {h.name: h.block_index for h in linears}
    got = {k: v for Fb in seen.values() for k, v in Fb.items()}
    assert set(got) == set(ref) and all(by_block[k] == i for i, Fb in seen.items() for k in Fb)
    for name, Fm in got.items():
        r = ref[name]
        assert Fm.shape == r.shape and r.max() > 0, name
        torch.testing.assert_close(Fm.double(), r, rtol=1e-4, atol=1e-6 * r.max().item(), msg=name)
    # and F is not the product of its marginals (what K-FAC's E[g²]·E[x²] assumes) on these inputs
    F0 = ref[linears[0].name]
    product = torch.outer(F0.sum(1), F0.sum(0))
    assert not torch.allclose(product / product.sum(), F0 / F0.sum(), rtol=0.05)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_resume_after_a_block_gives_the_identical_result(arch, tmp_path, one_thread):
    model, windows, stored, final = setup(arch)
    run = lambda **kw: blockwise_output_grad_sq(model, lambda i: stored[i], final, windows, "cpu", **kw)  # noqa: E731
    full = run()
    n = len(find_decoder_blocks(model)[1])
    k = n // 2  # killed right after block k finished
    ckpt = DiskCheckpoint(tmp_path / "bw" / "state.pt")
    assert ckpt.load() is None

    class Killed(Exception):
        pass

    def save_then_die(state: BackwardState):
        ckpt(state)
        if state.block == k - 1:
            raise Killed

    with pytest.raises(Killed):
        run(on_block_done=save_then_die)
    state = ckpt.load()
    assert state.block == k - 1 and len(state.delta) == len(windows)
    index = {h.name: h.block_index for h in find_linears(model)}
    assert state.sums and all(index[name] >= k for name in state.sums)
    seen = []
    resumed = run(start=state, on_block_done=lambda s: seen.append(s.block))
    assert seen == list(range(k - 2, -2, -1))
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


class _TupleBlock(torch.nn.Module):
    """A block returning ``(hidden, None)``, like transformers 4.x decoder layers."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, h, scale):
        return h + scale * self.fc2(torch.tanh(self.fc1(h))), None


class _TupleModel(torch.nn.Module):
    def __init__(self, vocab=32, d=16, n=3):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(num_hidden_layers=n)
        self.emb = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(_TupleBlock(d) for _ in range(n))
        self.norm, self.out = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab)

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h, 0.5)[0]
        return SimpleNamespace(logits=self.out(self.norm(h)))


def test_blocks_returning_tuples(one_thread):
    torch.manual_seed(0)
    model = _TupleModel().eval()
    windows = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    stored, final = replay_block_inputs(model, windows)
    head = Head(model)
    with torch.no_grad():
        torch.testing.assert_close(head.logits(final[0], windows[0]), model(windows[:1]).logits)
    assert head.tuple_output is True
    got = blockwise_output_grad_sq(model, lambda i: stored[i], final, windows, "cpu", head=head)
    ref = autograd_reference(model, windows)
    for name in ref:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-4, atol=1e-7 * ref[name].max().item())
