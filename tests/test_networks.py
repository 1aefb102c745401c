"""V-Net structure: the parameter counts of UA-MT's network, feature outputs, the factory."""
import pytest
import torch

from networks.net_factory_3d import available_networks, net_factory_3d
from networks.vnet import VNet
from utils.errors import UserError


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("normalization, expected", [("batchnorm", 9_448_866), ("none", 9_443_266),
                                                     ("instancenorm", 9_443_266), ("groupnorm", 9_448_866)])
def test_vnet_parameter_count_matches_ua_mt(normalization, expected):
    assert count(VNet(1, 2, 16, normalization=normalization)) == expected


def test_dropout_adds_no_parameters():
    assert count(VNet(1, 2, 16, "batchnorm", has_dropout=True)) == 9_448_866


def test_state_dict_keys_follow_the_anchors():
    keys = VNet(1, 2, 16, "batchnorm").state_dict().keys()
    assert "block_one.conv.0.weight" in keys and "block_five_up.conv.1.running_mean" in keys
    assert "out_conv.weight" in keys


def test_forward_shapes_and_features():
    net = VNet(1, 3, 8, "batchnorm").eval()
    x = torch.randn(2, 1, 32, 32, 16)
    logits, features = net(x, return_features=True)
    assert logits.shape == (2, 3, 32, 32, 16)
    assert [f.shape[1] for f in features["encoder"]] == [8, 16, 32, 64, 128]
    assert features["encoder"][4].shape[2:] == (2, 2, 1)
    assert features["decoder"].shape == (2, 8, 32, 32, 16)
    assert torch.equal(net(x), logits)
    assert torch.allclose(net.out_conv(features["decoder"]), logits)


def test_decoder_accepts_external_encoder_features():
    net = VNet(1, 2, 8).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    logits, _ = net.decoder(net.encoder(x))
    assert torch.equal(logits, net(x))


def test_dropout_only_in_train_mode():
    net = VNet(1, 2, 8, has_dropout=True)
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(0)
    a = net(x)
    assert not torch.equal(a, net(x))


def test_unknown_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization"):
        VNet(1, 2, 16, normalization="layernorm")


def test_factory_builds_on_cpu_with_defaults_and_overrides():
    net = net_factory_3d("vnet", 1, 2)
    assert count(net) == 9_448_866
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert count(net_factory_3d("vnet", 1, 2, normalization="none")) == 9_443_266
    assert net_factory_3d("vnet", 1, 2, has_dropout=True).has_dropout
    assert "vnet" in available_networks()


def test_factory_rejects_unknown_name():
    with pytest.raises(UserError, match="unknown network 'unet_9D'"):
        net_factory_3d("unet_9D", 1, 2)


def test_vnet_sdf_adds_a_tanh_distance_head_to_the_same_vnet():
    torch.manual_seed(0)
    net = net_factory_3d("vnet_sdf", has_dropout=True).eval()
    plain = sum(p.numel() for p in VNet(1, 2, 16, "batchnorm").parameters())
    assert sum(p.numel() for p in net.parameters()) == plain + 16 + 1  # one 1x1x1 conv, 16 -> 1 channel
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        logits, sdf, features = net(x, return_features=True)
        assert torch.equal(logits, net(x)[0])
    assert logits.shape == (2, 2, 32, 32, 16) and sdf.shape == (2, 1, 32, 32, 16)
    assert sdf.abs().max() < 1
    assert features["decoder"].shape == (2, 16, 32, 32, 16)


# -- network width (--n_filters) ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, at_16, at_8", [
    ("vnet", {}, 9_448_866, 2_364_434),
    ("vnet", {"normalization": "none"}, 9_443_266, 2_361_634),
    ("vnet_sdf", {}, 9_448_883, 2_364_443),
    ("resnet_vnet", {}, 17_930_354, 4_486_778),
    ("unet_3D", {}, 5_884_050, 1_471_498),
])
def test_parameter_counts_at_width_16_and_8(name, kwargs, at_16, at_8):
    assert count(net_factory_3d(name, 1, 2, **kwargs)) == at_16  # the default width is the papers' 16
    assert count(net_factory_3d(name, 1, 2, n_filters=16, **kwargs)) == at_16
    assert count(net_factory_3d(name, 1, 2, n_filters=8, **kwargs)) == at_8


SCRIPTS = ("train_supervised_3D", "train_mt_3D", "train_uamt_3D", "train_dtc_3D", "train_cps_3D", "train_ugmcl_3D",
           "train_ucseg_3D", "train_ugpl_3D")


def first_convolution_width(net):
    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d)).out_channels


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_builds_its_networks_at_the_width_asked(script):
    import importlib

    module = importlib.import_module(script)
    default = module.build_networks(module.get_parser().parse_args([]))
    sixteen = module.build_networks(module.get_parser().parse_args(["--n_filters", "16"]))
    eight = module.build_networks(module.get_parser().parse_args(["--n_filters", "8"]))
    assert {name: count(net) for name, net in default.items()} == {name: count(net) for name, net in sixteen.items()}
    for name, net in default.items():
        if any(isinstance(m, torch.nn.Conv3d) for m in net.modules()) and name != "upg":  # UC-Seg's fusion head
            assert first_convolution_width(net) == 16 and first_convolution_width(eight[name]) == 8, name
            assert count(eight[name]) < count(net) / 3.5, name
