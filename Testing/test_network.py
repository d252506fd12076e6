"""λ-conditioned network, checkpoints, label-map synthesis and the training loss (CPU, seconds)."""

import math

import pytest
import torch

from LearnedRegistrationLib.engine.grid import mm_per_normalized_unit
from LearnedRegistrationLib.learned.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    save_checkpoint,
)
from LearnedRegistrationLib.learned.network import (
    ConditionalInstanceNorm,
    NetworkConfig,
    RegistrationNetwork,
    crop_padding,
    pad_to_multiple,
    padded_shape,
    rescale_normalized_field,
)
from LearnedRegistrationLib.training.objective import (
    LossConfig,
    registration_loss,
    sample_lambda,
    soft_dice,
    train_step,
)
from LearnedRegistrationLib.training.synthesis import SynthesisConfig, one_hot, random_affine, synthesize_pair

from conftest import random_network

TINY = NetworkConfig(encoder_features=(4, 8, 8), decoder_features=(8, 4), head_features=4, condition_features=8, integration_steps=4, output_level=0)


def tiny_network(seed=0) -> RegistrationNetwork:
    return random_network(TINY, seed)


def images(shape=(1, 1, 13, 10, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def blob_labels(shape=(16, 16, 16)) -> torch.Tensor:
    """(1, 1, Z, Y, X) label map: background 0, a large ball 1 with an off-centre ball 2 inside, a slab 3."""
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in shape), indexing="ij")
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[(x**2 + y**2 + z**2) < 0.6] = 1
    labels[((x - 0.25) ** 2 + y**2 + (z + 0.2) ** 2) < 0.08] = 2
    labels[(z > 0.55) & (x.abs() < 0.5)] = 3
    return labels[None, None]


# --------------------------------------------------------------------------------- network
def test_output_shapes_for_odd_sizes_and_weight_map_in_open_interval():
    net = tiny_network().eval()
    fixed, moving = images((2, 1, 13, 10, 7))
    with torch.no_grad():
        out = net(fixed, moving, torch.tensor([0.2, 0.8]))
    assert out.velocity.shape == (2, 3, 13, 10, 7)
    assert out.displacement.shape == (2, 3, 13, 10, 7)
    assert out.weight_map.shape == (2, 1, 13, 10, 7)
    assert bool((out.weight_map > 0).all()) and bool((out.weight_map < 1).all())
    assert torch.isfinite(out.displacement).all()


def test_untrained_network_starts_near_identity_and_at_prior_weight():
    net = RegistrationNetwork(TINY).eval()
    fixed, moving = images((1, 1, 8, 8, 8))
    with torch.no_grad():
        out = net(fixed, moving, 0.5)
    assert out.displacement.abs().max() < 1e-3
    assert torch.allclose(out.weight_map, torch.full_like(out.weight_map, TINY.weight_map_init), atol=1e-3)


def test_lambda_conditions_the_output_and_gets_gradients():
    net = tiny_network().eval()
    fixed, moving = images((1, 1, 8, 8, 8))
    with torch.no_grad():
        low, high = net(fixed, moving, 0.0), net(fixed, moving, 1.0)
    assert (low.velocity - high.velocity).abs().max() > 1e-4
    assert (low.weight_map - high.weight_map).abs().max() > 1e-4
    # From the default (zero) FiLM init the conditioning layers still receive gradients, so they learn.
    fresh = RegistrationNetwork(TINY)
    out = fresh(fixed, moving, torch.tensor([0.3]))
    (out.velocity.square().sum() + out.weight_map.sum()).backward()
    film_grads = [p.grad.abs().sum() for n, p in fresh.named_parameters() if "film.weight" in n]
    assert film_grads and all(g > 0 for g in film_grads)


def test_bad_inputs_raise_clear_errors():
    net = tiny_network()
    fixed, moving = images((1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net(fixed, moving, 1.5)
    with pytest.raises(ValueError, match="'lam'"):
        net(fixed, moving, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="'moving'"):
        net(fixed, moving[:, :, :7], 0.1)
    with pytest.raises(ValueError, match="'fixed'"):
        net(fixed[:, 0], moving[:, 0], 0.1)
    with pytest.raises(ValueError, match="decoder_features"):
        NetworkConfig(encoder_features=(4, 8, 8), decoder_features=(8,), output_level=0)
    with pytest.raises(ValueError, match="output_level"):
        NetworkConfig(encoder_features=(4, 8, 8), decoder_features=(8,), output_level=2)


def test_half_resolution_output_and_cached_encoder_give_the_same_fields():
    config = NetworkConfig(encoder_features=(4, 8, 8), decoder_features=(8,), head_features=4, condition_features=8,
                           integration_steps=4, output_level=1)
    torch.manual_seed(0)
    net = RegistrationNetwork(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "film" in name or name in ("velocity_head.weight", "weight_head.weight"):
                p.normal_(0.0, 0.1)
        fixed, moving = torch.rand(1, 1, 9, 11, 13), torch.rand(1, 1, 9, 11, 13)
        whole = net(fixed, moving, 0.4)
        encoded = net.encode(fixed, moving)
        again = net.decode(encoded, 0.4)
        coarse = net.decode_coarse(encoded, 0.4)
        other = net.decode(encoded, 0.9)
    for a, b in zip(whole, again):
        assert a.shape[2:] == (9, 11, 13) and torch.equal(a, b)
    assert coarse.velocity.shape[2:] == tuple(n // 2 for n in padded_shape((9, 11, 13), config.divisor))
    assert (whole.displacement - other.displacement).abs().max() > 1e-4  # λ reaches the decoder
    assert all(not any(isinstance(m, ConditionalInstanceNorm) for m in block.modules()) for block in net.encoder)


def test_padding_round_trip_and_normalized_rescaling():
    x = torch.arange(5 * 6 * 7, dtype=torch.float32).view(1, 1, 5, 6, 7)
    padded, padding = pad_to_multiple(x, 4)
    assert padded.shape[2:] == padded_shape((5, 6, 7), 4) == (8, 8, 8)
    assert torch.equal(crop_padding(padded, padding), x)
    # A one-voxel shift along x is 2 / (n - 1) normalized units on a grid of n voxels.
    field = torch.zeros(1, 3, 8, 8, 8)
    field[:, 0] = 2.0 / 7.0
    cropped = rescale_normalized_field(crop_padding(field, padding), (8, 8, 8), (5, 6, 7))
    assert torch.allclose(cropped[:, 0], torch.full_like(cropped[:, 0], 2.0 / 6.0))
    assert torch.equal(cropped[:, 1:], torch.zeros_like(cropped[:, 1:]))


def test_shipped_default_network_fits_the_size_budget(tmp_path):
    net = RegistrationNetwork()
    path = save_checkpoint(tmp_path / "default.pt", net, {})
    assert net.parameter_count() < 1_000_000
    assert path.stat().st_size < 20 * 1024**2


# --------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_rebuilds_from_the_file_alone(tmp_path):
    net = tiny_network(seed=3).eval()
    metadata = {"data": "blobs", "iterations": 7, "wall_time_s": 1.5, "device": "cpu",
                "validation_curve": [{"step": 7, "dice": 0.5}]}
    path = save_checkpoint(tmp_path / "sub" / "net.pt", net, metadata)
    loaded, meta = load_checkpoint(path)
    assert meta == metadata
    assert loaded.config == net.config
    assert not loaded.training
    fixed, moving = images((1, 1, 9, 8, 11))
    with torch.no_grad():
        a, b = net(fixed, moving, 0.4), loaded(fixed, moving, 0.4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointNotFoundError, match="absent.pt") as info:
        load_checkpoint(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value)


def test_corrupt_or_foreign_or_incompatible_checkpoints_name_the_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", tiny_network(), {})
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    payload = torch.load(good, weights_only=True)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({**payload, "config": {**payload["config"], "head_features": 6}}, mismatched)
    unknown = tmp_path / "unknown_key.pt"
    torch.save({**payload, "config": {**payload["config"], "attention": True}}, unknown)
    assert payload["format"] == CHECKPOINT_FORMAT
    for path in (garbage, truncated, foreign, mismatched, unknown):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert isinstance(info.value, ValueError)
        assert str(path) in str(info.value), str(info.value)


def test_checkpoint_rejects_metadata_that_weights_only_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        save_checkpoint(tmp_path / "x.pt", tiny_network(), {"when": object()})
    # a str subclass (torch.__version__ is a TorchVersion) pickles as its class: weights_only refuses it
    with pytest.raises(ValueError, match="TorchVersion"):
        save_checkpoint(tmp_path / "x.pt", tiny_network(), {"torch": torch.__version__})
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------------- synthesis
def test_synthesis_is_seeded_and_has_the_requested_shapes():
    labels = blob_labels((12, 14, 10))
    config = SynthesisConfig(spacing_mm=4.0)
    a = synthesize_pair(labels, None, torch.Generator().manual_seed(5), config)
    b = synthesize_pair(labels, None, torch.Generator().manual_seed(5), config)
    c = synthesize_pair(labels, None, torch.Generator().manual_seed(6), config)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.fixed, c.fixed)
    for image in (a.fixed, a.moving):
        assert image.shape == (1, 1, 12, 14, 10) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    for warped in (a.fixed_labels, a.moving_labels):
        assert warped.shape == (1, 1, 12, 14, 10) and warped.dtype == torch.int64
        assert set(warped.unique().tolist()) <= {0, 1, 2, 3}
    # Independent contrasts: the fixed and moving images are not the same image.
    assert not torch.allclose(a.fixed, a.moving)


def test_synthesis_without_randomness_keeps_labels_and_maps_labels_to_intensity():
    labels = blob_labels((10, 10, 10))
    still = SynthesisConfig(spacing_mm=2.0, velocity_std_mm=0, rotation_deg=0, scaling=0, shear=0, translation_mm=0,
                            intensity_std=0, blur_sigma_mm=0, bias_std=0, gamma_std=0, noise_std=0, strip_probability=0)
    pair = synthesize_pair(labels, None, torch.Generator().manual_seed(0), still)
    assert torch.equal(pair.fixed_labels, labels) and torch.equal(pair.moving_labels, labels)
    for value in range(4):  # piecewise-constant image: one intensity per label
        assert pair.fixed[labels == value].std() < 1e-5


def test_random_affine_is_a_rotation_in_mm_on_a_non_cubic_grid():
    shape, spacing = (10, 20, 40), 2.0
    config = SynthesisConfig(spacing_mm=spacing, rotation_deg=30, scaling=0, shear=0, translation_mm=5)
    theta = random_affine(3, shape, config, torch.Generator().manual_seed(1))
    unit = torch.as_tensor(mm_per_normalized_unit(shape, spacing), dtype=torch.float32)
    linear_mm = theta[:, :, :3] * unit.view(1, 3, 1) / unit.view(1, 1, 3)  # D A_norm D^-1
    eye = torch.eye(3).expand(3, 3, 3)
    assert torch.allclose(linear_mm @ linear_mm.transpose(1, 2), eye, atol=1e-5)
    assert (theta[:, :, 3] * unit).abs().max() <= 5.0 + 1e-5


def test_one_hot_soft_dice_and_lambda_sampling():
    labels = blob_labels((8, 8, 8))
    hot = one_hot(labels, [1, 2, 3])
    assert hot.shape == (1, 4, 8, 8, 8) and torch.equal(hot.sum(1), torch.ones(1, 8, 8, 8))
    assert torch.allclose(soft_dice(hot, hot), torch.ones(1))
    other = one_hot(torch.zeros_like(labels), [1, 2, 3])
    other[:, 1] = 1 - hot[:, 1]
    assert float(soft_dice(hot[:, :2], other[:, :2])) < 1e-3
    lam = sample_lambda(20_000, torch.Generator().manual_seed(0), endpoint_probability=0.1)
    assert lam.min() == 0 and lam.max() == 1
    assert abs(float((lam == 0).float().mean()) - 0.1) < 0.01
    assert abs(float((lam == 1).float().mean()) - 0.1) < 0.01


# --------------------------------------------------------------------------------- training
def test_loss_terms_at_the_lambda_ends():
    from LearnedRegistrationLib.engine.regularization import diffusion
    from LearnedRegistrationLib.learned.network import NetworkOutput

    pair = synthesize_pair(blob_labels((8, 8, 8)), None, torch.Generator().manual_seed(2), SynthesisConfig(spacing_mm=4.0))
    g = torch.Generator().manual_seed(3)
    velocity = 0.05 * torch.randn((1, 3, 8, 8, 8), generator=g)
    output = NetworkOutput(velocity, torch.zeros_like(velocity), torch.full((1, 1, 8, 8, 8), 0.3))
    config = LossConfig(kappa=2.0, prior_weight=0.5)
    at0 = registration_loss(output, pair, torch.tensor([0.0]), [1, 2, 3], 4.0, config)
    at1 = registration_loss(output, pair, torch.tensor([1.0]), [1, 2, 3], 4.0, config)
    prior = -(math.log(0.3) + math.log(0.7))  # Beta(2, 2) NLL of a constant 0.3 map
    assert torch.allclose(at0.loss, 1 - at0.dice + 0.5 * prior, atol=1e-5)
    assert torch.allclose(at1.loss, 2.0 * at1.regularization + 0.5 * prior, atol=1e-5)
    # A constant map divided by its mean leaves the plain diffusion of the velocity in mm.
    unit = torch.tensor([4.0 * 7 / 2] * 3).view(1, 3, 1, 1, 1)
    assert torch.allclose(at1.regularization, diffusion(velocity * unit, (4.0,) * 3), rtol=1e-5)


def test_tiny_seeded_training_loop_lowers_the_loss():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = SynthesisConfig(spacing_mm=4.0, velocity_std_mm=6.0, velocity_spacing_mm=32.0)
    pair = synthesize_pair(blob_labels((16, 16, 16)), None, generator, config)
    net = RegistrationNetwork(TINY)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    lam = torch.tensor([0.05])
    values = [1, 2, 3]
    loss_config = LossConfig()

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            return float(registration_loss(net(pair.fixed, pair.moving, lam), pair, lam, values, 4.0, loss_config).loss)

    before = evaluate()
    for _ in range(12):
        terms = train_step(net, optimizer, pair, lam, values, 4.0, loss_config)
        assert math.isfinite(float(terms.loss))
    after = evaluate()
    assert after < before - 0.01, (before, after)
