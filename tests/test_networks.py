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
