"""The functional core of gradient quantization (no Lightning): quantizers, packing, backward hooks,
error feedback, the MetaGrad hypernetwork, and AMP's skip of non-finite steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stacktrain.errors import StackError
from stacktrain.functional.grad_quant_hypernet import GradientHyperNetwork, HypernetCompensation, hypernet_parameter_names
from stacktrain.functional.grad_quant import GradientQuantizer, apply_grad_quant, noise_seed
from stacktrain.functional.quantize import (
    NOISE_LEVELS, dequantize, fake_quantize, max_code, pack_codes, pack_int4, payload_bytes, quantize, relative_error,
    rounding_noise, unpack_codes, unpack_int4,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ quantizers
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_stay_in_the_signed_range_and_max_is_exact(bits):
    x = torch.randn(64, 33, generator=generator())
    q = quantize(x, bits, generator=generator(1))
    top = max_code(bits)
    assert q.codes.dtype == torch.int8
    assert int(q.codes.max()) <= top and int(q.codes.min()) >= -top
    assert torch.allclose(q.scale, x.abs().max() / top)
    # the largest magnitude is representable exactly, whatever the noise
    i = x.abs().argmax()
    assert torch.isclose(dequantize(q).flatten()[i], x.flatten()[i], rtol=1e-6)


def test_nearest_rounding_error_is_at_most_half_a_step():
    x = torch.randn(1000, generator=generator())
    q = quantize(x, 4, stochastic=False)
    assert (dequantize(q) - x).abs().max() <= q.scale / 2 + 1e-7


def test_rounding_noise_is_uniform_on_the_16_bit_grid_and_reproducible():
    u = rounding_noise(400_003, generator=generator(3))
    assert u.shape == (400_003,) and u.dtype == torch.float32
    assert 0 < float(u.min()) and float(u.max()) < 1
    levels = u * NOISE_LEVELS - 0.5
    assert torch.equal(levels, levels.round())  # exactly (k + 0.5) / 2^16
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / 400_003**0.5
    # the high and the low byte of each 16-bit value are both uniform: 256 bins, chi-square far from its
    # 0.999 quantile (~330) only if a byte is biased (a sign bit always 0 would empty half the bins)
    k = levels.long()
    for byte in (k >> 8, k & 255):
        counts = torch.bincount(byte, minlength=256).float()
        expected = u.numel() / 256
        assert float(((counts - expected) ** 2 / expected).sum()) < 330
    # the same generator state gives the same noise, also into a slice of a larger buffer
    buffer = torch.zeros(400_010)
    rounding_noise(400_003, generator=generator(3), out=buffer[5:400_008])
    assert torch.equal(buffer[5:400_008], u) and buffer[:5].eq(0).all() and buffer[400_008:].eq(0).all()
    assert not torch.equal(rounding_noise(1000, generator=generator(4)), u[:1000])


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    x = torch.linspace(-1, 1, 201) * 0.37 + 0.01
    draws = torch.stack([fake_quantize(x, 4, generator=generator(s)) for s in range(4000)])
    step = float(x.abs().max() / 7)
    # standard error of the mean of a two-point variable: at most step / 2 / sqrt(4000)
    assert (draws.mean(0) - x).abs().max() < 5 * step / 2 / 4000**0.5
    nearest_bias = (fake_quantize(x, 4, stochastic=False) - x).abs().max()
    assert nearest_bias > 0.2 * step  # rounding to nearest is biased for values between codes
    # each draw lands on one of the two neighbouring codes
    assert ((draws - x).abs() <= step + 1e-6).all()


def test_per_row_scales_follow_each_row():
    x = torch.stack([torch.randn(50, generator=generator(0)) * 1e-3, torch.randn(50, generator=generator(1)) * 10])
    per_row = quantize(x, 4, per_row=True, stochastic=False)
    assert per_row.scale.shape == (2, 1)
    assert torch.allclose(per_row.scale.flatten(), x.abs().amax(1) / 7)
    # with one scale for both rows, the small row is lost; with per-row scales it is kept
    assert relative_error(x[0], dequantize(per_row)[0]) < 0.2
    assert relative_error(x[0], fake_quantize(x, 4, stochastic=False)[0]) == 1.0


def test_inf_and_nan_pass_through_and_do_not_enter_the_scale():
    x = torch.tensor([0.5, -1.0, float("nan"), float("inf"), -float("inf"), 0.25])
    out = fake_quantize(x, 4, generator=generator())
    assert torch.isnan(out[2]) and out[3] == float("inf") and out[4] == -float("inf")
    assert torch.isfinite(out[[0, 1, 5]]).all()
    assert out[1] == -1.0  # the scale comes from the finite values (max |x| = 1)
    rows = torch.tensor([[1.0, float("nan")], [2.0, 4.0]])
    out = fake_quantize(rows, 8, per_row=True, stochastic=False)
    assert torch.isnan(out[0, 1]) and out[0, 0] == 1.0 and torch.allclose(out[1], rows[1], rtol=1e-2)


def test_zero_tensor_and_dtype_are_kept():
    assert torch.equal(fake_quantize(torch.zeros(3, 4), 4), torch.zeros(3, 4))
    x = torch.randn(8, 8, generator=generator()).to(torch.bfloat16)
    assert fake_quantize(x, 8).dtype == torch.bfloat16


def test_int8_error_is_far_below_int4_error():
    x = torch.randn(4096, generator=generator())
    e8 = float(relative_error(x, fake_quantize(x, 8, generator=generator(1))))
    e4 = float(relative_error(x, fake_quantize(x, 4, generator=generator(1))))
    assert e8 < 0.02 and 0.1 < e4 < 0.5 and e4 > 10 * e8


# ------------------------------------------------------------------------------------ packing
def test_int4_packing_round_trips_two_codes_per_byte():
    codes = torch.randint(-8, 8, (1001,), dtype=torch.int8, generator=generator())
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 501 == payload_bytes(1001, 4)
    assert torch.equal(unpack_int4(packed, 1001), codes)
    # the low nibble holds the first code: -1 (0xF) then 2 (0x2) -> 0x2F
    assert pack_int4(torch.tensor([-1, 2], dtype=torch.int8)).tolist() == [0x2F]
    rows = torch.stack([pack_int4(codes), pack_int4(-codes.clamp(-7, 7))])
    assert torch.equal(unpack_int4(rows, 1001)[1], -codes.clamp(-7, 7))


def test_int8_payload_is_one_byte_per_code():
    codes = torch.randint(-127, 128, (77,), dtype=torch.int8, generator=generator())
    payload = pack_codes(codes, 8)
    assert payload.numel() == 77 == payload_bytes(77, 8)
    assert torch.equal(unpack_codes(payload, 8, 77), codes)


def test_noise_seed_is_deterministic_and_separates_keys():
    assert noise_seed(0, 1, 2) == noise_seed(0, 1, 2)
    seeds = {noise_seed(0, rank, 0, batch) for rank in range(4) for batch in range(100)}
    assert len(seeds) == 400


# ------------------------------------------------------------------------------------ hooks
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU(inplace=True)  # in place, right after the hooked conv
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.fc(self.relu(self.conv(x)).flatten(1)))


def grads_of(model, x, y, quantizer=None, seed=0):
    model.zero_grad(set_to_none=True)
    if quantizer is not None:
        quantizer.reseed(seed)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_weight_hooks_quantize_every_trainable_gradient_and_skip_frozen():
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    reference = grads_of(model, x, y)
    quantizer = apply_grad_quant(model, 4, "weights", stochastic=False)
    got = grads_of(model, x, y, quantizer)
    assert set(got) == set(reference) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    for name in got:
        assert torch.allclose(got[name], fake_quantize(reference[name], 4, stochastic=False), atol=1e-7), name
        assert len(torch.unique(got[name])) <= 15
    quantizer.remove()
    assert all(torch.equal(a, b) for a, b in zip(grads_of(model, x, y).values(), reference.values()))


def test_activation_hooks_quantize_the_gradient_entering_each_layer():
    """Quantizing the output gradient of fc per row, by hand, gives the same weight gradients."""
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    quantizer = apply_grad_quant(model, 4, "activations", stochastic=False)
    assert quantizer.layers == ["conv", "fc"]  # the frozen linear is not hooked
    got = grads_of(model, x, y, quantizer)
    # by hand: forward without hooks, quantize d loss / d fc-output per row, backpropagate
    quantizer.remove()
    features = model.relu(model.conv(x)).flatten(1)
    out = model.fc(features)
    grad_out = torch.autograd.grad(F.cross_entropy(model.frozen(out), y), out, retain_graph=True)[0]
    q_out = fake_quantize(grad_out, 4, per_row=True, stochastic=False)
    fc_weight_grad = torch.autograd.grad(out, model.fc.weight, q_out)[0]
    assert torch.allclose(got["fc.weight"], fc_weight_grad, atol=1e-6)
    assert not torch.allclose(got["fc.weight"], grads_of(model, x, y)["fc.weight"], atol=1e-6)
    assert quantizer.error_count["activations"] == 2


def test_stochastic_rounding_is_reproducible_from_the_seed():
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    quantizer = apply_grad_quant(model, 4, "both")
    a, b, c = (grads_of(model, x, y, quantizer, seed) for seed in (5, 5, 6))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_gradient_accumulation_sums_dequantized_micro_batch_gradients():
    torch.manual_seed(0)
    model = Net()
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))) for _ in range(2)]
    quantizer = apply_grad_quant(model, 4, "weights")
    parts = [grads_of(model, x, y, quantizer, seed=i) for i, (x, y) in enumerate(batches)]
    model.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        quantizer.reseed(i)
        F.cross_entropy(model(x), y).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, parts[0][name] + parts[1][name], atol=1e-7)


def test_error_feedback_carries_the_residual_and_tracks_the_sum():
    """With error feedback the sum of quantized gradients stays within one residual of the true sum."""
    param = nn.Parameter(torch.zeros(256))
    model = nn.Module()
    model.p = param
    quantizer = apply_grad_quant(model, 2, "weights", stochastic=False, error_feedback=True)
    plain = GradientQuantizer(2, "weights", stochastic=False)
    g = torch.randn(256, generator=generator()) * torch.logspace(-3, 0, 256)
    total_true, total_ef, total_plain = torch.zeros(256), torch.zeros(256), torch.zeros(256)
    for step in range(50):
        param.grad = None
        (param * g).sum().backward()
        quantizer.commit()
        total_true += g
        total_ef += param.grad
        total_plain += plain.quantize_weight_gradient("p", g)
    residual = quantizer.residuals["p"]
    assert torch.allclose(total_true, total_ef + residual, atol=1e-4)
    assert relative_error(total_true, total_ef) < 0.1 < relative_error(total_true, total_plain)


def test_error_feedback_with_stochastic_rounding_keeps_the_exact_sum_and_beats_plain_rounding():
    """Stochastic rounding: the quantized sum plus the residual is the true sum to float precision, each
    residual lies within one step of its corrected gradient (round to nearest: half a step, above), and
    the sum tracks the true sum far better than plain stochastic rounding's."""
    param = nn.Parameter(torch.zeros(64))
    model = nn.Module()
    model.p = param
    quantizer = apply_grad_quant(model, 2, "weights", stochastic=True, error_feedback=True)
    plain = GradientQuantizer(2, "weights", stochastic=True)
    quantizer.reseed(1)
    plain.reseed(1)
    g = torch.linspace(-1.0, 1.0, 64) * torch.logspace(-2, 0, 64)
    total_true, total_ef, total_plain = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    residual = torch.zeros(64)
    for _ in range(200):
        step = float((g + residual).abs().max()) / max_code(2)
        param.grad = None
        (param * g).sum().backward()
        quantizer.commit()
        residual = quantizer.residuals["p"]
        assert float(residual.abs().max()) < step * (1 + 1e-6)
        assert float(residual.abs().max()) > 0
        total_true += g
        total_ef += param.grad
        total_plain += plain.quantize_weight_gradient("p", g)
    assert torch.allclose(total_true, total_ef + residual, atol=1e-5)
    # the residual's share of the sum falls as 1/steps, plain rounding noise's as 1/sqrt(steps): 0.0098 against 0.062
    assert relative_error(total_true, total_ef) < 0.02 < 0.05 < relative_error(total_true, total_plain)


def test_error_feedback_rollback_and_loss_scale():
    model = nn.Module()
    model.p = nn.Parameter(torch.zeros(4))
    quantizer = apply_grad_quant(model, 2, "weights", stochastic=False, error_feedback=True)
    g = torch.tensor([1.0, 0.3, -0.2, 0.05])
    quantizer.quantize_weight_gradient("p", g)
    quantizer.commit()
    committed = quantizer.residuals["p"].clone()
    quantizer.quantize_weight_gradient("p", g)  # a step that AMP will skip
    quantizer.rollback()
    assert torch.equal(quantizer.residuals["p"], committed)
    # residuals are stored unscaled: the same gradient at loss scale 1024 leaves the same residual
    scaled = apply_grad_quant(model, 2, "weights", stochastic=False, error_feedback=True)
    scaled.loss_scale = 1024.0
    scaled.quantize_weight_gradient("p", g * 1024)
    scaled.commit()
    assert torch.allclose(scaled.residuals["p"], committed)


def test_bad_settings_raise_stack_errors():
    with pytest.raises(StackError, match="bits=9"):
        GradientQuantizer(9)
    with pytest.raises(StackError, match="targets='gradients'"):
        GradientQuantizer(4, "gradients")
    with pytest.raises(StackError, match="targets='activations'"):
        GradientQuantizer(4, "activations", error_feedback=True)


# ------------------------------------------------------------------------------------ MetaGrad
def test_hypernetwork_starts_as_identity_and_is_odd_and_scale_equivariant():
    net = GradientHyperNetwork(8, generator=generator())
    g = torch.randn(5, 7, generator=generator(1))
    assert torch.allclose(net(g), g)
    with torch.no_grad():
        net.output.weight.normal_(generator=generator(2))
    assert not torch.allclose(net(g), g)
    assert torch.allclose(net(-g), -net(g), atol=1e-6)
    assert torch.allclose(net(1e-4 * g), 1e-4 * net(g), rtol=1e-4, atol=1e-12)
    with_weight = GradientHyperNetwork(8, "gradient_and_weight", generator=generator())
    with pytest.raises(ValueError, match="needs the weight"):
        with_weight(g)
    assert with_weight(g, torch.randn(5, 7)).shape == g.shape


def test_linear_hypernetwork_is_a_learned_gain():
    """MetaQuant's linear meta-network: H(g) = (1 + W2 W1) g, bias-free, identity at the start."""
    net = GradientHyperNetwork(100, generator=generator(), kind="linear")
    assert net.hidden.weight.shape == (100, 1) and net.hidden.bias is None and net.output.bias is None
    g = torch.randn(6, 5, generator=generator(1))
    assert torch.allclose(net(g), g)
    with torch.no_grad():
        net.output.weight.copy_(0.01 * net.hidden.weight.T)
    gain = 1 + 0.01 * float(net.hidden.weight.pow(2).sum())  # about 2
    assert gain > 1.5
    assert torch.allclose(net(g), gain * g, rtol=1e-5, atol=1e-6)
    assert torch.allclose(net(3 * g + 1), gain * (3 * g + 1), rtol=1e-5, atol=1e-6)  # linear, not only odd
    with pytest.raises(StackError, match="hypernet='rnn'"):
        GradientHyperNetwork(4, kind="rnn")


def test_hypernet_targets_pick_conv_and_linear_weights():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model.pos = nn.Parameter(torch.zeros(3))
    model[3].bias.requires_grad_(False)
    assert hypernet_parameter_names(model, "weights") == {"0.weight", "3.weight"}
    assert hypernet_parameter_names(model, "all") == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "pos"}
    with pytest.raises(StackError, match="hypernet_targets='convs'"):
        hypernet_parameter_names(model, "convs")


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_meta_gradient_equals_building_the_update_into_the_next_forward(kind):
    """The hypernetwork's gradient from `HypernetCompensation` equals the one autograd gives when
    the next forward uses w_next = w - lr * H(g) (MetaQuant's injection, via functional_call)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x1, y1, x2, y2 = torch.randn(16, 5), torch.randint(0, 3, (16,)), torch.randn(16, 5), torch.randint(0, 3, (16,))
    lr = 0.1
    meta = HypernetCompensation(hidden=4, seed=3, kind=kind)
    with torch.no_grad():
        meta.net.output.weight.normal_(generator=generator(4))  # not the identity any more
    reference_net = GradientHyperNetwork(4, generator=generator(), kind=kind)
    reference_net.load_state_dict(meta.net.state_dict())
    named = [(n, p, lr) for n, p in model.named_parameters()]

    # step 1: gradients at w, updates H(g) applied by plain SGD
    F.cross_entropy(model(x1), y1).backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta.transform(named)
    with torch.no_grad():
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, reference_net(g1[n]))
            p -= lr * p.grad
    meta.commit()

    # reference: the next loss through w - lr * H(g), differentiated w.r.t. the hypernetwork
    injected = {n: w1[n] - lr * reference_net(g1[n]) for n in w1}
    loss2 = F.cross_entropy(torch.func.functional_call(model, injected, (x2,)), y2)
    expected = torch.autograd.grad(loss2, list(reference_net.parameters()))

    # HypernetCompensation: the same gradient from the next step's ordinary gradients
    model.zero_grad()
    F.cross_entropy(model(x2), y2).backward()
    meta.optimizer.zero_grad()
    meta.meta_backward(named)
    got = [p.grad for p in meta.net.parameters()]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)
    assert any(float(b.abs().max()) > 0 for b in expected)


def test_transform_trains_the_hypernetwork_and_commit_rollback():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(50))
    meta = HypernetCompensation(hidden=4, seed=0)
    before = [t.clone() for t in meta.net.parameters()]
    p.grad = torch.randn(50)
    assert meta.transform([("p", p, 0.1)])
    assert [torch.equal(a, b) for a, b in zip(before, meta.net.parameters())] == [True, True]  # nothing to learn from yet
    meta.rollback()
    assert meta.previous == {}
    p.grad = torch.randn(50)
    meta.transform([("p", p, 0.1)])
    meta.commit()
    assert set(meta.previous) == {"p"}
    p.grad = torch.randn(50)
    meta.transform([("p", p, 0.1)])
    assert not torch.equal(before[1], meta.net.output.weight)  # the output layer left zero: it learns


def test_non_finite_gradients_leave_the_hypernetwork_alone():
    p = nn.Parameter(torch.randn(10))
    meta = HypernetCompensation(hidden=4, seed=0)
    p.grad = torch.randn(10)
    meta.transform([("p", p, 0.1)])
    meta.commit()
    state = [t.clone() for t in meta.net.parameters()]
    bad = torch.randn(10)
    bad[3] = float("nan")
    p.grad = bad.clone()
    assert not meta.transform([("p", p, 0.1)])
    assert torch.isnan(p.grad[3]) and torch.equal(p.grad[:3], bad[:3])
    assert all(torch.equal(a, b) for a, b in zip(state, meta.net.parameters()))


# ------------------------------------------------------------------------------------ AMP
def amp_run(quantize_grads: bool, compensation: str, nan_step: int = 2, steps: int = 4):
    """A plain fp16-autocast loop with a CPU GradScaler; the batch of ``nan_step`` holds a NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    quantizer = (apply_grad_quant(model, 4, "both", error_feedback=compensation == "error_feedback")
                 if quantize_grads else None)
    meta = HypernetCompensation(hidden=4, seed=0) if compensation == "hypernet" else None
    named = [(n, p, 0.1) for n, p in model.named_parameters()]
    data = torch.Generator().manual_seed(1)
    history = []
    for step in range(steps):
        x, y = torch.randn(8, 6, generator=data), torch.randint(0, 3, (8,), generator=data)
        if step == nan_step:
            x[0, 0] = float("nan")
        if quantizer is not None:
            quantizer.reseed(step)
            quantizer.loss_scale = scaler.get_scale()
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if meta is not None:
            meta.transform(named)
        weights_before = [p.detach().clone() for p in model.parameters()]
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale_before  # the scaler backs off only after a skipped step
        for part in (quantizer, meta):
            if part is not None:
                (part.commit if stepped else part.rollback)()
        history.append((stepped, None, scaler.get_scale(), weights_before, [p.detach().clone() for p in model.parameters()],
                        None if meta is None else [t.clone() for t in meta.net.parameters()]))
    return history


@pytest.mark.parametrize("compensation", ["none", "error_feedback", "hypernet"])
def test_a_nan_gradient_skips_the_step_under_amp_as_without_quantization(compensation):
    plain = amp_run(False, "none")
    quantized = amp_run(True, compensation)
    for step, (p, q) in enumerate(zip(plain, quantized)):
        assert p[0] == q[0] == (step != 2)  # the scaler skipped exactly the NaN step, in both runs
        assert p[2] == q[2]  # and backed off its scale the same way
    skipped = quantized[2]
    assert all(torch.equal(a, b) for a, b in zip(skipped[3], skipped[4]))  # weights did not move
    assert not all(torch.equal(a, b) for a, b in zip(quantized[3][3], quantized[3][4]))  # the next step does
    if compensation == "hypernet":
        assert all(torch.equal(a, b) for a, b in zip(quantized[1][5], quantized[2][5]))  # hypernetwork untouched


# ------------------------------------------------------------------------------------ DDP hook
@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group, so that DDP and its communication hook run in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.27), (4, 0.14)])
def test_compressed_hook_sends_k_bit_codes_and_one_scale_per_parameter(single_process_group, bits, bound):
    from stacktrain.functional.grad_quant import CompressedCommState, quantized_allgather_hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = CompressedCommState(bits)
    ddp.register_comm_hook(state, quantized_allgather_hook)
    state.reseed(0)
    F.cross_entropy(ddp(x), y).backward()
    sent, fp32, buckets = state.take_counts()
    numel = reference.numel()
    assert fp32 == 4 * numel
    parameters = list(model.parameters())
    assert sent == payload_bytes(numel, bits) + 4 * len(parameters)  # packed codes + a float32 scale per parameter
    assert sent / fp32 <= bound and buckets == 1
    for parameter, grad in zip(parameters, torch.split(reference, [p.numel() for p in parameters])):
        step = grad.abs().max() / max_code(bits)  # each parameter's own scale
        assert ((parameter.grad.flatten() - grad).abs() <= step * (1 + 1e-5)).all()
        assert len(torch.unique(parameter.grad)) <= 2 * max_code(bits) + 1
    assert state.take_counts() == (0, 0, 0)


def test_compressed_hook_result_does_not_depend_on_the_bucket_layout(single_process_group):
    """One scale and one noise stream per parameter: the same gradients whether DDP puts all
    parameters in one bucket or each in its own (a resumed run's fresh DDP groups them otherwise)."""
    from stacktrain.functional.grad_quant import CompressedCommState, quantized_allgather_hook

    results = []
    for bucket_cap_mb in (25.0, 0.0001):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
        state = CompressedCommState(4)
        state.index_parameters(model)
        ddp.register_comm_hook(state, quantized_allgather_hook)
        x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
        for _ in range(2):  # DDP rebuilds its buckets (by bucket_cap_mb) after the first backward
            model.zero_grad()
            state.take_counts()
            state.reseed(7)
            F.cross_entropy(ddp(x), y).backward()
        results.append(([p.grad.clone() for p in model.parameters()], state.take_counts()[2]))
    (one, buckets_one), (many, buckets_many) = results
    assert buckets_one == 1 and buckets_many > 1
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_compressed_hook_turns_a_non_finite_bucket_into_nan_for_the_grad_scaler(single_process_group):
    from stacktrain.functional.grad_quant import CompressedCommState, quantized_allgather_hook

    model = nn.Linear(4, 2)
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(CompressedCommState(4), quantized_allgather_hook)
    x = torch.randn(3, 4)
    x[0, 0] = float("inf")
    ddp(x).sum().backward()
    assert not torch.isfinite(model.weight.grad).any() and not torch.isfinite(model.bias.grad).any()


@pytest.mark.parametrize("stochastic", [True, False])
def test_compressed_hook_gives_each_parameter_exactly_its_own_quantization(single_process_group, stochastic):
    """The whole-bucket hook sends, per parameter, exactly `quantize` with that parameter's own scale and
    its own seeded noise stream (so exact resume and the bucket-layout independence hold)."""
    from stacktrain.functional.grad_quant import _Generators, CompressedCommState, quantized_allgather_hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = CompressedCommState(4, stochastic=stochastic)
    state.index_parameters(model)
    ddp.register_comm_hook(state, quantized_allgather_hook)
    state.reseed(11)
    F.cross_entropy(ddp(x), y).backward()
    streams = _Generators()
    streams.reseed(11)
    for index, (parameter, grad) in enumerate(zip(model.parameters(), reference)):
        q = quantize(grad.flatten(), 4, stochastic=stochastic, generator=streams.for_parameter(grad.device, index))
        assert torch.equal(parameter.grad.flatten(), dequantize(q))


def test_hypernet_cut_keeps_the_last_updates_of_the_kept_channels():
    hypernet = HypernetCompensation(hidden=4)
    weight = nn.Parameter(torch.randn(4, 3))
    weight.grad = torch.arange(12.0).reshape(4, 3)
    hypernet.transform([("w", weight, 0.1)])
    hypernet.commit()
    hypernet.cut({"w": {0: torch.tensor([0, 2])}})
    assert torch.equal(hypernet.previous["w"].grad, torch.tensor([[0.0, 1, 2], [6, 7, 8]]))
