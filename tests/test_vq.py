"""VQ-VAE, quantiser, transformer engines and sampler on tiny networks."""

import numpy as np
import pytest
import torch

from synth.vq.quantizer import EMAQuantizer
from synth.vq.sampler import sample_codes, torch_threads
from synth.vq.transformer import CodeTransformer, WavefrontDecoder, fast_transformers_available, resolve_engine, wavefront_order
from synth.vq.vqvae import build_vqvae

needs_ft = pytest.mark.skipif(not fast_transformers_available(),
                              reason="pytorch-fast-transformers is not installed (scripts/setup.sh builds it)")
ENGINES = ["torch", pytest.param("fast-transformers", marks=needs_ft)]

TINY_AE = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 2, "channels": [8, 8],
           "num_res_blocks": 1, "norm_num_groups": 4, "attention_levels": [False, False],
           "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}


def tiny_tf(engine, attention="linear", seq_len=40, seed=0, code_shape=(2, 4, 5), window=None, prior_top=None,
            wavefront=False):
    torch.manual_seed(seed)
    model = CodeTransformer(12, seq_len, 3, d_model=16, n_layers=2, n_heads=2, d_ff=32, attention=attention,
                            code_shape=code_shape, window=window, prior_top=prior_top, wavefront=wavefront,
                            engine=engine).eval()
    if prior_top:
        model.set_prior(torch.randint(0, 12, (30, seq_len)))
    return model


# -- quantiser ------------------------------------------------------------------------------------
def test_quantizer_assigns_the_nearest_code():
    q = EMAQuantizer(4, 2)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    z = torch.tensor([[0.9, 0.1], [0.1, 0.8], [4.0, 4.5], [0.0, 0.1]]).t().reshape(1, 2, 4, 1, 1)
    assert q.assign(z).flatten().tolist() == [1, 2, 3, 0]
    assert torch.equal(q.embed(q.assign(z))[0, :, 2, 0, 0], torch.tensor([5.0, 5.0]))


def test_quantizer_ema_pulls_codes_to_their_vectors_and_straight_through_keeps_gradients():
    q = EMAQuantizer(2, 1, decay=0.5).train()
    q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    q.ema_sum.copy_(q.codebook)
    z = torch.full((1, 1, 2, 2, 2), 2.0, requires_grad=True)
    out = q(z)
    assert 0.0 < q.codebook[0, 0] < 2.0 and q.codebook[1, 0] > 9.0  # code 0 moved toward 2, code 1 barely
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    assert out.perplexity.item() == pytest.approx(1.0)  # one code used


def test_dead_codes_are_restarted_onto_encoder_outputs():
    q = EMAQuantizer(8, 2, dead_threshold=0.5)
    q.ema_count.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0, 5.0, 0.1, 5.0, 5.0]))
    z = torch.randn(1, 2, 4, 4, 4) + 100.0
    n = q.restart_dead(z, torch.Generator().manual_seed(0))
    assert n == 3
    assert (q.codebook[[2, 3, 5]] > 90).all() and (q.codebook[[0, 1, 4]].abs() < 10).all()
    assert (q.ema_count >= 0.5).all()


def test_kmeans_init_uses_every_code():
    q = EMAQuantizer(8, 2)
    centres = torch.arange(8.0)[:, None].repeat(1, 2) * 10
    vectors = (centres[:, None] + 0.1 * torch.randn(8, 50, 2)).reshape(-1, 2)
    q.init_codebook(vectors)
    assert len(torch.unique(torch.cdist(vectors, q.codebook).argmin(1))) == 8


# -- VQ-VAE ---------------------------------------------------------------------------------------
def test_vqvae_shapes_encode_decode_and_bad_shape():
    vq = build_vqvae({"autoencoder": TINY_AE, "num_embeddings": 16, "embedding_dim": 3}).eval()
    x = torch.rand(1, 1, 8, 12, 8)
    idx = vq.encode(x)
    assert idx.shape == (1, 4, 6, 4) and idx.dtype == torch.int64 and int(idx.max()) < 16
    assert vq.decode_codes(idx).shape == x.shape
    out = vq(x)
    assert out.reconstruction.shape == x.shape and torch.equal(out.indices, idx)
    with pytest.raises(ValueError, match="must divide by 2"):
        vq.encode(torch.rand(1, 1, 9, 12, 8))


def test_vqvae_assignments_do_not_depend_on_bf16_autocast():
    vq = build_vqvae({"autoencoder": TINY_AE, "num_embeddings": 16, "embedding_dim": 2}).eval()
    z = torch.randn(1, 2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = vq.quantizer.assign(z)
    assert torch.equal(a, vq.quantizer.assign(z))


# -- transformer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("code_shape,window,prior,wavefront", [((2, 4, 5), None, None, False), (None, None, None, False),
                                                              ((2, 4, 5), 20, 4, False), ((2, 4, 5), 15, None, False),
                                                              ((2, 4, 5), 20, 4, True)])
def test_recurrent_decoding_matches_the_parallel_pass_token_by_token(engine, attention, code_shape, window, prior, wavefront):
    model = tiny_tf(engine, attention, code_shape=code_shape, window=window, prior_top=prior, wavefront=wavefront)
    tokens, cond = torch.randint(0, 12, (2, 40)), torch.rand(2, 3)
    with torch.no_grad():
        parallel = model(tokens, cond)
    dec = model.decoder(cond)
    steps = torch.stack([dec.step(None if i == 0 else tokens[:, i - 1]) for i in range(40)], 1)
    assert (steps - parallel).abs().max().item() < 1e-4
    assert torch.equal(steps.argmax(-1), parallel.argmax(-1))
    with pytest.raises(ValueError, match="all 40 tokens"):
        dec.step(tokens[:, -1])


# -- wavefront ------------------------------------------------------------------------------------
def wave_logits(model, tokens, cond):
    """Teacher-forced logits (B, L, K) from the WavefrontDecoder, and the positions in decoding order."""
    dec = model.wavefront_decoder(cond)
    out = torch.full((*tokens.shape, model.config["num_tokens"]), float("nan"))
    prev, order = None, []
    for _ in range(dec.steps):
        pos, logits = dec.step(prev)
        assert torch.isnan(out[:, pos]).all()  # each position once
        out[:, pos] = logits.transpose(0, 1)
        prev, order = tokens[:, pos].t(), order + pos.tolist()
    with pytest.raises(ValueError, match="all 60 tokens"):
        dec.step(prev)
    return out, order


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("prior", [None, 4])
def test_wavefront_decoding_matches_the_parallel_pass_token_by_token(engine, attention, prior):
    model = tiny_tf(engine, attention, seq_len=60, code_shape=(3, 4, 5), window=20, prior_top=prior, wavefront=True)
    tokens, cond = torch.randint(0, 12, (2, 60)), torch.rand(2, 3)
    if engine == "fast-transformers" and attention == "softmax":  # its recurrent key cache: one length per batch
        assert model.schedule == "sequential"
        with pytest.raises(ValueError, match="cannot decode softmax"):
            model.wavefront_decoder(cond)
        return
    assert model.schedule == "wavefront"
    with torch.no_grad():
        parallel = model(tokens, cond)
    steps, order = wave_logits(model, tokens, cond)
    assert model.wavefront_decoder(cond).steps == 3 - 1 + 20  # blocks side by side, one position apart
    assert order == wavefront_order(60, 20).tolist() and sorted(order) == list(range(60))
    assert order[:4] == [0, 1, 20, 2]  # step 1: block 0 position 1, block 1 position 0
    assert (steps - parallel).abs().max().item() < 1e-4
    assert torch.equal(steps.argmax(-1), parallel.argmax(-1))


def test_wavefront_block_starts_drop_the_previous_token_and_nothing_else():
    """With ``wavefront`` a block's first token does not see the previous block's last token (its only
    link to earlier blocks is the slab-back context); without it, it does, as before."""
    a = torch.randint(0, 12, (1, 40))
    b = a.clone()
    b[0, 19] = (b[0, 19] + 5) % 12  # the last token of block 0 (not a context neighbour of 20)
    c = a.clone()
    c[0, 0] = (c[0, 0] + 5) % 12  # the slab-back neighbour of position 20
    cond = torch.ones(1, 3)
    for wavefront in (True, False):
        model = tiny_tf("torch", window=20, wavefront=wavefront)
        with torch.no_grad():
            la, lb, lc = model(a, cond), model(b, cond), model(c, cond)
            xa, xb = model.inputs(a, cond), model.inputs(b, cond)
        assert torch.allclose(la[:, 20], lb[:, 20], atol=1e-6) == wavefront
        assert not torch.allclose(la[:, 20], lc[:, 20], atol=1e-6)  # the slab-back context still reaches it
        assert not torch.allclose(la[:, 39], lb[:, 39], atol=1e-6)  # 19 is 39's slab-back neighbour
        diff = (xb - xa)[0, 20]
        expected = torch.zeros(16) if wavefront else model.tok_emb.weight[b[0, 19]] - model.tok_emb.weight[a[0, 19]]
        assert torch.allclose(diff, expected, atol=1e-6)
        same = torch.ones(40, dtype=torch.bool)
        same[[20, 39]] = False
        assert torch.equal(xb[:, same], xa[:, same])  # no other input changes
    with torch.no_grad():  # the first token of the sequence has no previous token either way
        x = tiny_tf("torch", window=20, wavefront=True).inputs(a, cond)
        y = tiny_tf("torch", window=20).inputs(a, cond)
    assert torch.allclose(x[:, :20], y[:, :20]) and torch.allclose(x[:, 21:], y[:, 21:])


def test_wavefront_needs_a_window_its_context_allows():
    with pytest.raises(ValueError, match="wavefront.*window"):
        tiny_tf("torch", wavefront=True)  # no window
    with pytest.raises(ValueError, match="divides"):
        tiny_tf("torch", window=15, wavefront=True)
    with pytest.raises(ValueError, match="row/slab neighbour"):
        tiny_tf("torch", window=10, wavefront=True)  # half slabs: a row-back neighbour would come later
    assert tiny_tf("torch", window=20, wavefront=True).config["wavefront"] is True
    assert tiny_tf("torch", window=20).schedule == "sequential" and tiny_tf("torch").config["wavefront"] is False
    with pytest.raises(ValueError, match="trained with `wavefront`"):
        WavefrontDecoder(tiny_tf("torch", window=20), torch.ones(1, 3))
    twin = tiny_tf("torch", window=20, wavefront=True).with_engine("torch")
    assert twin.config["wavefront"] and twin.schedule == "wavefront"


@needs_ft
@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_engines_share_weights_and_compute_the_same_function(attention):
    ft = tiny_tf("fast-transformers", attention)
    pt = ft.with_engine("torch")
    assert set(ft.state_dict()) == set(pt.state_dict())
    tokens, cond = torch.randint(0, 12, (2, 40)), torch.rand(2, 3)
    with torch.no_grad():
        assert (ft(tokens, cond) - pt(tokens, cond)).abs().max().item() < 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_training_pass_runs_under_bf16_autocast(engine):
    model = tiny_tf(engine, window=20).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 12, (2, 40)), torch.rand(2, 3))
    logits.float().sum().backward()
    assert model.tok_emb.weight.grad is not None and torch.isfinite(model.tok_emb.weight.grad).all()


def test_the_position_prior_is_the_smoothed_frequency_of_each_code():
    model = tiny_tf("torch", prior_top=2, seq_len=40)
    codes = torch.zeros(10, 40, dtype=torch.long)
    codes[:7, 3] = 5  # position 3: code 5 seven times, code 0 three times
    model.set_prior(codes, alpha=0.5)
    p = torch.softmax(model.prior_logits(3, 1)[0], -1)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert p[5].item() == pytest.approx(7.5 / (10 + 0.5 * 12), abs=1e-5)
    assert p[0].item() == pytest.approx(3.5 / 16, abs=1e-5)
    assert p[7].item() == pytest.approx(0.5 / 16, abs=1e-5)  # the rest share what is left


def test_prefix_predictions_do_not_see_the_future():
    model = tiny_tf("torch")
    a = torch.randint(0, 12, (1, 40))
    b = a.clone()
    b[0, 25:] = (b[0, 25:] + 1) % 12
    with torch.no_grad():
        la, lb = model(a, torch.ones(1, 3)), model(b, torch.ones(1, 3))
    assert torch.allclose(la[:, :26], lb[:, :26], atol=1e-5)  # logits up to 25 see tokens < 25 only
    assert not torch.allclose(la[:, 26:], lb[:, 26:], atol=1e-5)


def test_a_window_restarts_attention_at_block_boundaries():
    a = torch.randint(0, 12, (1, 40))
    b = a.clone()
    b[0, :18] = (b[0, :18] + 3) % 12  # the first block changes, except its last two tokens
    for window, reaches in ((20, False), (None, True)):
        model = tiny_tf("torch", window=window, code_shape=None)  # no row/slab context: attention only
        with torch.no_grad():
            la, lb = model(a, torch.ones(1, 3)), model(b, torch.ones(1, 3))
        assert not torch.allclose(la[:, :19], lb[:, :19], atol=1e-5)
        assert torch.allclose(la[:, 20:], lb[:, 20:], atol=1e-6) != reaches


def test_neighbour_context_is_the_code_one_row_and_one_slab_back():
    from synth.vq.transformer import _context_index

    idx = _context_index((2, 3, 4))  # raster: pos = (x * 3 + y) * 4 + z
    assert idx[0, (1 * 3 + 2) * 4 + 1].item() == (1 * 3 + 1) * 4 + 1  # y - 1
    assert idx[1, (1 * 3 + 2) * 4 + 1].item() == (0 * 3 + 2) * 4 + 1  # x - 1
    assert idx[0, (1 * 3 + 0) * 4 + 3].item() == -1 and idx[1, 3].item() == -1
    assert (idx < torch.arange(24)).all()  # always earlier in raster order
    with pytest.raises(ValueError, match="code_shape"):
        CodeTransformer(4, 10, 1, d_model=8, n_heads=2, code_shape=(2, 2, 2), engine="torch")


def test_engine_choice_is_validated():
    assert resolve_engine("torch") == "torch"
    assert resolve_engine("auto") in ("torch", "fast-transformers")
    with pytest.raises(ValueError, match="engine"):
        resolve_engine("cuda-magic")
    with pytest.raises(ValueError, match="attention"):
        CodeTransformer(4, 8, 1, d_model=8, n_heads=2, attention="sparse", engine="torch")
    with pytest.raises(ValueError, match="divide"):
        CodeTransformer(4, 8, 1, d_model=10, n_heads=4, engine="torch")


# -- sampler --------------------------------------------------------------------------------------
def test_sampling_is_seeded_conditional_and_leaves_threads_alone():
    model = tiny_tf("torch")
    with torch.no_grad():
        model.head.weight.mul_(5)
        model.cond_proj.weight.mul_(5)
    cond = torch.tensor([[0.2, 1.0, 1.0]])
    threads = torch.get_num_threads()
    a = sample_codes(model, cond, seed=1)
    assert torch.get_num_threads() == threads
    assert torch.equal(a, sample_codes(model, cond, seed=1))
    assert not torch.equal(a, sample_codes(model, cond, seed=2))
    assert not torch.equal(a, sample_codes(model, torch.tensor([[0.9, 0.0, 1.0]]), seed=1))
    g = sample_codes(model, cond, seed=1, guidance_scale=3.0)
    assert g.shape == (40,) and not torch.equal(a, g)
    greedy = sample_codes(model, cond, seed=5, top_k=1)
    assert torch.equal(greedy, sample_codes(model, cond, seed=6, top_k=1))


@pytest.mark.parametrize("engine", ENGINES)
def test_wavefront_sampling_is_seeded_and_agrees_with_sequential_greedy_decoding(engine):
    model = tiny_tf(engine, seq_len=60, code_shape=(3, 4, 5), window=20, prior_top=4, wavefront=True)
    with torch.no_grad():
        model.head.weight.mul_(5)
        model.cond_proj.weight.mul_(5)
    cond = torch.tensor([[0.2, 1.0, 1.0]])
    calls = []
    a = sample_codes(model, cond, seed=1, progress=lambda i, n: calls.append((i, n)))
    assert a.shape == (60,) and calls[-1] == (60, 60)
    assert torch.equal(a, sample_codes(model, cond, seed=1))  # same seed, same codes
    assert not torch.equal(a, sample_codes(model, cond, seed=2))
    g = sample_codes(model, cond, seed=1, guidance_scale=3.0)
    assert torch.equal(g, sample_codes(model, cond, seed=1, guidance_scale=3.0)) and not torch.equal(a, g)
    for scale in (1.0, 3.0):  # greedy: the same codes whichever schedule walks the model
        wave = sample_codes(model, cond, seed=5, top_k=1, guidance_scale=scale)
        assert torch.equal(wave, sample_codes(model, cond, seed=6, top_k=1, guidance_scale=scale, schedule="sequential"))
    with pytest.raises(ValueError, match="schedule"):
        sample_codes(model, cond, seed=0, schedule="diagonal")


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k")])
def test_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_codes(tiny_tf("torch"), torch.ones(1, 3), seed=0, **kwargs)


def test_torch_threads_restores_on_error():
    old = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == old
