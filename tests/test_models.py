"""The shared building blocks in models/: site-id upsampling and the lesion definition."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.lesions import components, lesion_instances, near_bone
from models.networks import (BONE, EDEMA, LOG_EPS, NetworkConfig, build_network, fill_edema, forward_tta,
                             shifted_edema, upsample_site_ids, widen_input_weights)
from models.sites import by_code, mirror_ids


def test_site_ids_equal_the_argmax_of_nearest_upsampled_logits():
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 3, 4, 5)
    ref = F.interpolate(logits, scale_factor=2, mode="nearest")[0]
    assert torch.equal(upsample_site_ids(logits, bone_only=False), ref.argmax(0).to(torch.uint8))
    assert torch.equal(upsample_site_ids(logits), (ref[1:].argmax(0) + 1).to(torch.uint8))
    assert upsample_site_ids(logits).shape == (6, 8, 10)


def test_lesions_are_26_connected_and_small_ones_dropped():
    mask = np.zeros((12, 12, 12), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True          # corner neighbours: one lesion of 2 voxels
    mask[6:9, 6:9, 6:9] = True                     # 27 voxels
    mask[11, 0, 11] = True                         # isolated single voxel
    inst = lesion_instances(mask, voxel_ml=0.1, min_ml=0.2)
    assert inst.max() == 2 and set(np.unique(inst)) == {0, 1, 2}
    assert inst[1, 1, 1] == inst[2, 2, 2] != 0
    assert inst[11, 0, 11] == 0
    assert (inst > 0).sum() == 29


def test_lesion_rules_drop_unconfident_and_off_bone_lesions():
    prob = np.zeros((16, 16, 16), np.float32)
    prob[1:4, 1:4, 1:4] = 0.95      # confident, in bone
    prob[8:11, 8:11, 8:11] = 0.6    # faint, in bone
    prob[13:16, 0:3, 13:16] = 0.97  # confident, far from bone
    bone = np.zeros_like(prob, bool)
    bone[0:12, 0:12, 0:12] = True
    near = near_bone(bone)
    args = (prob > 0.5, 0.1, 0.5)
    assert lesion_instances(*args).max() == 3
    assert lesion_instances(*args, prob=prob, min_confidence=0.9).max() == 2
    kept = lesion_instances(*args, near=near, min_bone_fraction=0.5, prob=prob, min_confidence=0.9)
    assert kept.max() == 1 and kept[2, 2, 2] == 1 and kept[9, 9, 9] == 0 and kept[14, 1, 14] == 0
    comp = components(prob > 0.5, near, prob)
    assert np.allclose(sorted(comp.confidence[1:]), [0.6, 0.95, 0.97])
    for rule in [(0.5, 0.0, 0.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.9), (3.0, 0.0, 0.0)]:  # select == one-shot
        assert np.array_equal(comp.select(0.1, *rule),
                              lesion_instances(*args[:2], rule[0], near, rule[1], prob, rule[2]))


def test_batch_norm_network_gives_the_same_output_for_a_patch_and_the_whole_volume_interior():
    """With fixed (eval) statistics the network is translation-equivariant up to its receptive field: a voxel deep
    inside a crop gets the same logits as in the full volume, which instance norm would not give."""
    cfg = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), features=4, patch=(32, 32, 32))
    net = build_network(cfg).eval()
    torch.manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        full, _ = net(x)
        part, _ = net(x[..., 16:48, 16:48, 16:48])
    inner = (slice(None), slice(None), slice(14, 18), slice(14, 18), slice(14, 18))
    centre = full[..., 16:48, 16:48, 16:48][inner]
    assert torch.allclose(part[inner], centre, atol=1e-4)


def test_a_network_widened_to_the_log_channel_computes_what_the_old_one_did_and_sees_ratios():
    """--init from a one-channel bundle: the zero-padded input weights give identical outputs; after that the log
    channel is an ordinary input (a 2x brighter voxel differs by log 2 there, whatever the base brightness)."""
    torch.manual_seed(0)
    small = dict(channels=(4, 8, 16), strides=(2, 2), features=4, patch=(32, 32, 32))
    old = build_network(NetworkConfig(**small)).eval()
    new = build_network(NetworkConfig(**small, log_channel=True)).eval()
    fit, widened = widen_input_weights(old.state_dict(), new.state_dict())
    assert widened and all(new.state_dict()[k].shape[1] == 2 for k in widened)
    new.load_state_dict(fit)
    x = torch.rand(1, 1, 32, 32, 32).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        (v0, s0), (v1, s1) = old(x), new(x)
    assert torch.allclose(v0, v1, atol=1e-5) and torch.allclose(s0, s1, atol=1e-5)
    from models.networks import with_log_channel
    two = with_log_channel(x)
    assert two.shape[1] == 2 and two.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(two[:, :1], x) and torch.allclose(two[:, 1:], torch.log(x + LOG_EPS))
    pair = with_log_channel(torch.tensor([0.1, 0.2, 0.4, 0.8]).view(1, 1, 4, 1, 1))[0, 1, :, 0, 0]
    assert torch.allclose(pair[1] - pair[0], pair[3] - pair[2], atol=0.1)  # same ratio, nearly the same step
    # a genuinely different second channel changes the output once its weights are not zero
    with torch.no_grad():
        for k in widened:
            new.state_dict()[k][:, 1:].normal_()
        v2, _ = new(x)
    assert not torch.allclose(v1, v2, atol=1e-3)


def test_a_constant_background_offset_is_removed_before_scaling():
    from models.preprocessing import background_offset, normalise
    rng = np.random.default_rng(0)
    img = np.zeros((40, 40, 40), np.float32)
    img[5:35, 5:35, 5:35] = rng.uniform(0.1, 0.3, (30, 30, 30))
    img[15:20, 15:20, 15:20] = 1.0
    img += np.abs(rng.normal(0, 0.005, img.shape)).astype(np.float32)  # a noise floor in the air
    assert background_offset(img) == 0.0  # dark air: nothing is subtracted
    for offset in (0.5, 500.0):  # an export's constant offset, small and large against the signal
        assert background_offset(img + offset) == pytest.approx(offset, abs=0.01)
        assert np.allclose(normalise(img + offset), normalise(img), atol=0.02)
    assert np.allclose(normalise(img - 100.0), normalise(img), atol=1e-4)  # negative values: lifted to 0


def test_p75_reference_fixes_the_75th_body_percentile_whatever_the_bright_organs():
    from models.preprocessing import P75_TO_P99, _body_sample, normalise, rereference
    rng = np.random.default_rng(0)
    img = np.zeros((40, 40, 40), np.float32)
    img[5:35, 5:35, 5:35] = rng.uniform(0.1, 0.3, (30, 30, 30))  # muscle-level body
    bright = img.copy()
    bright[10:20, 10:20, 10:30] = 1.0  # plus a fluid-bright organ, as in a whole-body view
    for vol in (img, bright):
        out = normalise(vol * 123.0, "p75")
        assert np.percentile(_body_sample(out)[1], 75) == pytest.approx(P75_TO_P99, rel=0.02)
        assert np.allclose(rereference(normalise(vol), "p75"), out, atol=1e-5)
    # p99 moves with the bright organ (the body's muscle-level signal drops to ~0.3), p75 hardly does
    assert normalise(bright)[20, 25, 25] < 0.5 * normalise(img)[20, 25, 25]
    assert normalise(bright, "p75")[20, 25, 25] == pytest.approx(normalise(img, "p75")[20, 25, 25], rel=0.15)
    assert np.array_equal(rereference(normalise(img), "p99"), normalise(img))
    with pytest.raises(ValueError, match="unknown intensity reference"):
        rereference(img, "p50")


def test_mirror_ids_swap_left_and_right_and_keep_midline_sites():
    mirror = np.array(mirror_ids())
    assert mirror[0] == 0 and (mirror[mirror] == np.arange(len(mirror))).all()
    codes = by_code()
    assert mirror[codes["femur_left"].id] == codes["femur_right"].id
    midline = [s.id for s in codes.values() if s.side not in ("left", "right")]
    assert midline and (mirror[midline] == midline).all()


def test_flip_tta_gives_mirror_symmetric_outputs_for_a_mirror_symmetric_input():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(channels=(4, 8, 16), strides=(2, 2), features=4, patch=(32, 32, 32))).eval()
    half = torch.rand(1, 1, 16, 24, 32)
    x = torch.cat([half, torch.flip(half, (2,))], 2)  # left half mirrors the right half
    with torch.no_grad():
        plain_v, _ = forward_tta(net, x, "none")
        voxel, sites = forward_tta(net, x, "flip_lr")
    swap = torch.as_tensor(mirror_ids())
    assert not torch.allclose(plain_v, torch.flip(plain_v, (2,)), atol=1e-4), "a random net alone is not symmetric"
    assert torch.allclose(voxel, torch.flip(voxel, (2,)), atol=1e-5)
    assert torch.allclose(sites, torch.flip(sites, (2,)).index_select(1, swap), atol=1e-5)
    with torch.no_grad():
        anatomy_v, anatomy_s = forward_tta(net, x, "flip_lr_anatomy")
    assert torch.equal(anatomy_v[:, EDEMA], plain_v[:, EDEMA]), "flip_lr_anatomy leaves the edema channel alone"
    assert torch.equal(anatomy_v[:, BONE:], voxel[:, BONE:]) and torch.equal(anatomy_s, sites)
    with pytest.raises(ValueError, match="tta"):
        forward_tta(net, x, "rotate")
    with torch.no_grad():
        filled_v, filled_s = forward_tta(net, x, "flip_lr_anatomy_filled")
    assert torch.equal(filled_v[:, EDEMA], plain_v[:, EDEMA]), "the filled mode keeps the plain pass's edema too"
    assert filled_s.shape == sites.shape


class _Pointwise(torch.nn.Module):
    """A translation-equivariant stand-in for the network: logits are a voxel-wise function of the input."""
    size_divisor = 1

    def forward(self, x):
        return torch.cat([6 * x - 3] * 3, 1), torch.zeros(x.shape[0], 2, *(n // 2 for n in x.shape[2:]))


def test_shift_tta_averages_each_voxel_with_itself_seen_at_other_stride_phases():
    x = torch.rand(1, 1, 32, 32, 64)
    with torch.no_grad():
        plain, _ = _Pointwise()(x)
        for n in (4, 8):   # every shifted pass is cropped back onto the same voxels
            assert torch.allclose(shifted_edema(_Pointwise(), x, plain[:, EDEMA], n), plain[:, EDEMA], atol=1e-4)
    torch.manual_seed(0)
    net = build_network(NetworkConfig(channels=(4, 8, 16), strides=(2, 2), features=4, patch=(32, 32, 32))).eval()
    with torch.no_grad():
        anatomy_v, anatomy_s = forward_tta(net, x, "flip_lr_anatomy")
        shift_v, shift_s = forward_tta(net, x, "flip_lr_anatomy_shift4")
    assert torch.equal(shift_v[:, BONE:], anatomy_v[:, BONE:]) and torch.equal(shift_s, anatomy_s)
    edge = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))   # a strided net is not shift-equivariant
    assert not torch.allclose(shift_v[:, EDEMA][edge], anatomy_v[:, EDEMA][edge], atol=1e-3)


def test_shift_tta_keeps_input_sizes_a_multiple_of_a_deep_networks_strides():
    """Six stride-2 levels need sizes that are multiples of 64: each shifted pass is padded to one."""
    torch.manual_seed(0)
    net = build_network(NetworkConfig(channels=(4,) * 7, strides=(2,) * 6, features=4, patch=(64, 64, 64))).eval()
    assert net.size_divisor == 64
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        v, s = forward_tta(net, x, "flip_lr_anatomy_shift4")
    assert v.shape[2:] == x.shape[2:] and torch.isfinite(v).all()


def test_fill_edema_paints_a_lesion_over_with_its_own_bones_marrow():
    torch.manual_seed(0)
    img = torch.full((1, 1, 30, 30, 30), 0.1)           # soft tissue
    bone = torch.zeros_like(img, dtype=torch.bool)
    bone[..., 5:25, 5:25, 5:25] = True
    img[bone] = 0.3 + 0.01 * torch.rand(int(bone.sum()))  # normal marrow
    edema = torch.zeros_like(img)
    edema[..., 12:18, 12:18, 12:18] = 0.9                 # a 6-voxel lesion deep in the bone
    lesion_img = img.clone()
    lesion_img[edema > 0.5] = 1.5
    out = fill_edema(lesion_img, edema, bone.float())
    assert out.shape == img.shape and out is not lesion_img
    inside = edema > 0.5
    assert torch.allclose(out[inside], torch.tensor(0.305), atol=0.01), "filled with the marrow around it"
    far = torch.ones_like(inside)
    far[..., 10:20, 10:20, 10:20] = False
    assert torch.equal(out[far], lesion_img[far]), "voxels away from the lesion are untouched"
    assert fill_edema(img, torch.zeros_like(img), bone.float()) is img, "nothing to fill: the input itself"
    big = torch.zeros_like(img)
    big[..., 2:28, 2:28, 2:28] = 0.9                      # a hole wider than the window fills from its rim inwards
    assert torch.isfinite(fill_edema(lesion_img, big, bone.float())).all()
