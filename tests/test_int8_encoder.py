"""torch-dynamic's executor options (issue 21.4): per-channel weight scales, 8-bit activations, outlier input channels
in fp32. CPU only, tiny encoders built by the tests."""

import pytest
import torch

from ewq.analysis import fingerprint
from ewq.apply import apply_plan, load_for_plan, load_model, prepare_for_plan
from ewq.backends import QuantSettings
from ewq.backends import torch_dynamic as td
from ewq.checkpoint import open_checkpoint
from ewq.common import EWQError
from ewq.plan import builtin_plan
from ewq.source import ModelSource

DYNAMIC = torch.ao.nn.quantized.dynamic.Linear


def full_range_bits() -> int:
    """8-bit activations where this CPU's kernel is exact with them (VNNI), else torch's 7."""
    return 8 if td.full_range_error() <= 0.01 else 7


def chosen(**kw) -> QuantSettings:
    """The configuration bench/int8_encoder.py recommends."""
    return QuantSettings("torch-dynamic", weight_scales="channel", act_bits=full_range_bits(), outlier_channels=8, **kw)


def uniform_plan(path):
    ckpt = open_checkpoint(path)
    return builtin_plan("uniform-8bit", ModelSource(str(path), path), ckpt, fingerprint(ckpt, progress=False), 32)


def test_defaults_are_exactly_torchs_quantize_dynamic_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48)
    x = torch.randn(5, 96) * 3
    ours = td.quantize_layer(lin, "8-bit", QuantSettings("torch-dynamic"), torch.float32)
    theirs = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0]
    assert type(ours) is DYNAMIC  # torch's own class, not the subclass
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert QuantSettings("torch-dynamic").key() == {"backend": "torch-dynamic"}  # older cache keys stay valid


def test_outlier_channels_are_exact_in_float_and_rescue_the_others():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(40, 64)
    x[:, 7] *= 60  # one channel far above the rest sets the per-tensor activation scale
    with torch.no_grad():
        y = lin(x)
        plain = td._make_layer(lin.weight, lin.bias, per_channel=True, act_bits=7)
        split = td._make_layer(lin.weight, lin.bias, per_channel=True, act_bits=7, outliers=torch.tensor([7]))
        err = lambda q: float((q(x) - y).norm() / y.norm())
        assert err(split) < err(plain) / 4
        # the int8 product sees channel 7 as zero and the fp32 product adds exactly x[:, 7] W[:, 7]^T
        x0 = x.clone()
        x0[:, 7] = 0
        assert torch.allclose(split(x) - split(x0), x[:, 7:8] * lin.weight[:, 7], atol=1e-4)


def planted_outlier(path):
    """The tiny encoder with one residual channel 30x the rest (MiniLM's [CLS]-driven channels, in miniature)."""
    model = load_model(path, torch.float32, "encoder")
    with torch.no_grad():
        model.encoder.layer[0].output.LayerNorm.weight[5] *= 30
    return model


def embeddings(path, model, n=48):
    from ewq import embed, quality
    from ewq.source import load_tokenizer

    embedder = embed.Embedder.of(path, open_checkpoint(path).config, load_tokenizer(path))
    return embedder.embed(model, embed.corpus_sentences(quality.load_corpus(), n))


def test_preparing_leaves_the_float_model_unchanged_and_chosen_beats_default(tiny_encoder):
    path = tiny_encoder("bert")
    plan = uniform_plan(path)
    reference = embeddings(path, planted_outlier(path))
    model = planted_outlier(path)
    report = prepare_for_plan(model, plan, chosen(), path, "encoder")
    assert torch.equal(embeddings(path, model), reference)  # prepare only chooses and attaches channels
    assert any(r["outliers"] for r in report.values())  # the planted channel was found somewhere
    apply_plan(model, plan, chosen(), torch.float32, progress=False)
    default = planted_outlier(path)
    apply_plan(default, plan, QuantSettings("torch-dynamic"), torch.float32, progress=False)
    loss = lambda m: float((1 - torch.cosine_similarity(embeddings(path, m), reference)).mean())
    assert loss(model) < loss(default) / 2


def test_outlier_channels_need_the_calibration_step(tiny_encoder):
    path = tiny_encoder("bert")
    model = load_model(path, torch.float32, "encoder")
    with pytest.raises(EWQError, match="calibration"):
        apply_plan(model, uniform_plan(path), chosen(), torch.float32, progress=False)


@pytest.mark.parametrize("options, flag", [({"weight_scales": "row"}, "--weight-scales"), ({"act_bits": 6}, "--act-bits"),
                                           ({"outlier_channels": 9}, "--outlier-channels"),
                                           ({"outlier_channels": -1}, "--outlier-channels")])
def test_bad_options_are_refused_in_one_line(options, flag):
    with pytest.raises(EWQError, match=flag) as e:
        td.check(QuantSettings("torch-dynamic", **options), torch.float32, "cpu")
    assert "\n" not in str(e.value)


def test_8bit_activations_refused_where_the_kernel_saturates(monkeypatch):
    monkeypatch.setattr(td, "full_range_error", lambda: 0.5)  # what AVX2 without VNNI measures
    with pytest.raises(EWQError, match="VNNI") as e:
        td.check(QuantSettings("torch-dynamic", act_bits=8), torch.float32, "cpu")
    assert "\n" not in str(e.value)
    td.check(QuantSettings("torch-dynamic", act_bits=7), torch.float32, "cpu")  # torch's default still runs


def test_benchmark_flags_belong_to_torch_dynamic(tiny_encoder, tmp_path):
    from ewq.runner import run

    path = tiny_encoder("bert")
    with pytest.raises(EWQError, match="--weight-scales applies to --backend torch-dynamic only") as e:
        run("ewq", ["--model", str(path), "--plan", "uniform-8bit", "--backend", "torchao", "--device", "cpu",
                    "--weight-scales", "channel", "--out-dir", str(tmp_path)])
    assert "\n" not in str(e.value)


def test_save_and_load_keep_the_options(tiny_encoder, tmp_path):
    from transformers import AutoTokenizer

    from ewq.artifact import load_quantized, save_quantized
    from ewq.serve import batching_policy

    path = tiny_encoder("bert")
    plan = uniform_plan(path)
    model, applied = load_for_plan(path, plan, chosen(), torch.float32, "encoder", progress=False)
    layers = [m for m in model.modules() if isinstance(m, DYNAMIC)]
    assert layers and all(type(m) is td.Int8DynamicLinear for m in layers)
    assert applied.prepared and any(m.outlier_index is not None for m in layers)
    saved, _ = save_quantized(model, plan, ModelSource(str(path), path), plan["model"]["fingerprint"],
                              AutoTokenizer.from_pretrained(path), chosen(), torch.float32, tmp_path / "q")
    loaded, _, meta = load_quantized(saved, "encoder")
    assert meta["method"] == "dynamic-ptq-int8"
    assert {k: meta[k] for k in ("weight_scales", "act_bits", "outlier_channels")} == \
        {"weight_scales": "channel", "act_bits": full_range_bits(), "outlier_channels": 8}
    ids = {"input_ids": torch.tensor([[2, 7, 8, 9, 10, 3]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(**ids).last_hidden_state, model(**ids).last_hidden_state)
    # one activation scale per tensor: a vector would depend on its batch-mates, so no cross-request batching
    assert batching_policy(meta, "encoder")["cross_request"] is False
