"""The timm zoo of the coverage sweep: the smallest model (fewest parameters) of every module in
``timm.list_modules()`` (timm 1.0.31; 98 modules). Written by ``python -m pyprune.app.bench.timm_zoo``, which builds
every model on the meta device to count its parameters (about 20 minutes on 2 cores), so the sweep does not.
"""
import sys
from typing import Dict, Tuple

TIMM_ZOO: Tuple[str, ...] = (
    "beit_base_patch16_224",  # beit, 86.5 M params
    "halonet_h1",  # byoanet, 8.1 M params
    "test_byobnet",  # byobnet, 0.5 M params
    "cait_xxs24_224",  # cait, 12.0 M params
    "coat_tiny",  # coat, 5.5 M params
    "convit_tiny",  # convit, 5.7 M params
    "convmixer_768_32",  # convmixer, 21.1 M params
    "test_convnext",  # convnext, 0.3 M params
    "cpubone_nano",  # cpubone, 6.5 M params
    "crossvit_tiny_240",  # crossvit, 7.0 M params
    "csatv2",  # csatv2, 11.1 M params
    "cs3darknet_focus_s",  # cspnet, 3.3 M params
    "cspnext_tiny",  # cspnext, 2.7 M params
    "davit_tiny",  # davit, 28.4 M params
    "deepseek_vit_412m",  # deepseek_vit, 411.8 M params
    "deit_tiny_patch16_224",  # deit, 5.7 M params
    "densenet121",  # densenet, 8.0 M params
    "dla46x_c",  # dla, 1.1 M params
    "dpn48b",  # dpn, 9.1 M params
    "edgenext_xx_small",  # edgenext, 1.3 M params
    "efficientformer_l1",  # efficientformer, 12.3 M params
    "efficientformerv2_s0",  # efficientformer_v2, 3.6 M params
    "test_efficientnet",  # efficientnet, 0.4 M params
    "efficientvim_m1",  # efficientvim, 6.7 M params
    "efficientvit_b0",  # efficientvit_mit, 3.4 M params
    "efficientvit_m0",  # efficientvit_msra, 2.3 M params
    "vit_tiny_patch16_dinov3_qkvb",  # eva, 5.5 M params
    "fasternet_t0",  # fasternet, 3.9 M params
    "fastvit_t8",  # fastvit, 4.0 M params
    "focalnet_tiny_srf",  # focalnet, 28.4 M params
    "gcvit_xxtiny",  # gcvit, 12.0 M params
    "gemma4_vit_167m",  # gemma4_vit, 167.4 M params
    "ghostnet_050",  # ghostnet, 2.6 M params
    "hardcorenas_b",  # hardcorenas, 5.2 M params
    "hgnetv2_b0",  # hgnet, 6.0 M params
    "hiera_tiny_224",  # hiera, 27.9 M params
    "sam2_hiera_tiny",  # hieradet_sam2, 26.9 M params
    "hrnet_w18_small",  # hrnet, 13.2 M params
    "iformer_t",  # iformer, 2.9 M params
    "inception_next_atto",  # inception_next, 4.2 M params
    "inception_resnet_v2",  # inception_resnet_v2, 55.8 M params
    "inception_v3",  # inception_v3, 23.8 M params
    "inception_v4",  # inception_v4, 42.7 M params
    "lcnetv2_small",  # lcnetv2, 4.1 M params
    "levit_128s",  # levit, 7.8 M params
    "lowformer_b0",  # lowformer, 14.1 M params
    "test_mambaout",  # mambaout, 0.4 M params
    "test_coatnet",  # maxxvit, 0.6 M params
    "poolformerv2_s12",  # metaformer, 11.9 M params
    "gmlp_ti16_224",  # mlp_mixer, 5.9 M params
    "mobilenetv3_small_050",  # mobilenetv3, 1.6 M params
    "mobilenetv5_base",  # mobilenetv5, 82.6 M params
    "mobilevit_xxs",  # mobilevit, 1.3 M params
    "mvitv2_tiny",  # mvitv2, 24.2 M params
    "naflexvit_base_patch16_parfac_gap",  # naflexvit, 86.5 M params
    "nasnetalarge",  # nasnet, 88.8 M params
    "nest_tiny",  # nest, 17.1 M params
    "nextvit_small",  # nextvit, 31.8 M params
    "test_nfnet",  # nfnet, 0.4 M params
    "pit_ti_224",  # pit, 4.8 M params
    "pnasnet5large",  # pnasnet, 86.1 M params
    "pvt_v2_b0",  # pvt_v2, 3.7 M params
    "qwen3_vit_88m",  # qwen3_vit, 87.4 M params
    "rdnet_tiny",  # rdnet, 23.9 M params
    "regnetx_002",  # regnet, 2.7 M params
    "repghostnet_050",  # repghost, 2.3 M params
    "repvit_m1",  # repvit, 5.5 M params
    "res2next50",  # res2net, 24.7 M params
    "resnest14d",  # resnest, 10.6 M params
    "test_resnet",  # resnet, 0.5 M params
    "resnetv2_18",  # resnetv2, 11.7 M params
    "rexnet_100",  # rexnet, 4.8 M params
    "selecsls42",  # selecsls, 30.4 M params
    "legacy_seresnet18",  # senet, 11.8 M params
    "sequencer2d_s",  # sequencer, 27.7 M params
    "shvit_s1",  # shvit, 6.3 M params
    "skresnet18",  # sknet, 12.0 M params
    "starnet_s050",  # starnet, 0.5 M params
    "swiftformer_xs",  # swiftformer, 3.5 M params
    "swin_tiny_patch4_window7_224",  # swin_transformer, 28.3 M params
    "swinv2_tiny_window8_256",  # swin_transformer_v2, 28.3 M params
    "swinv2_cr_tiny_224",  # swin_transformer_v2_cr, 28.3 M params
    "tiny_vit_5m_224",  # tiny_vit, 12.1 M params
    "tnt_s_legacy_patch16_224",  # tnt, 23.8 M params
    "tresnet_m",  # tresnet, 31.4 M params
    "twins_svt_small",  # twins, 24.1 M params
    "vgg11",  # vgg, 132.9 M params
    "visformer_tiny",  # visformer, 10.3 M params
    "test_vit",  # vision_transformer, 0.4 M params
    "vit_tiny_r_s16_p8_224",  # vision_transformer_hybrid, 6.3 M params
    "test_vit_relpos",  # vision_transformer_relpos, 0.9 M params
    "samvit_base_patch16_224",  # vision_transformer_sam, 86.5 M params
    "vitamin_small_224",  # vitamin, 22.2 M params
    "volo_d1_224",  # volo, 26.6 M params
    "ese_vovnet19b_slim_dw",  # vovnet, 1.9 M params
    "legacy_xception",  # xception, 22.9 M params
    "xception41p",  # xception_aligned, 26.9 M params
    "xcit_nano_12_p8_224",  # xcit, 3.0 M params
)


def smallest_per_module() -> Dict[str, Tuple[str, int]]:
    """``{module: (model name, parameter count)}``: the smallest model of every timm module (built on meta)."""
    import timm
    import torch
    found = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"):
                    params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # models that cannot be built without downloads or extras
                continue
            if module not in found or params < found[module][1]:
                found[module] = (name, params)
    return found


if __name__ == "__main__":
    for module, (name, params) in sorted(smallest_per_module().items()):
        print(f'    "{name}",  # {module}, {params / 1e6:.1f} M params')
    sys.exit(0)
