"""Random SD shapes the benchmarks build (with tests/tiny_sd.make_sd_folder's overrides)."""

# A medium SD: SD 1.5's layout (4 levels, 2 layers, 8 heads) at a fifth of its width.
MEDIUM = dict(
    clip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4),
    unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
              cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
              sample_size=32,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    vae=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32,
             down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256))

# A small SD: 3 UNet levels of 64/128/256 channels (8 heads), MEDIUM's text tower, and a VAE that
# downsamples 4x (so 256 px gives SD 1.5's 64x64 latents at 512 px, 4096 tokens).
SMALL = dict(
    clip=MEDIUM["clip"],
    unet=dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
              attention_head_dim=8, norm_num_groups=32, sample_size=64,
              down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2),
    vae=dict(block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=32,
             down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, sample_size=256))

PRESETS = {
    # tests/tiny_sd.py's own SD (2 levels of 16/32 channels, a VAE that downsamples 2x): what the
    # dry run of bench/gpu.sh runs, for the code paths and not the times.
    "tiny": {},
    "medium": MEDIUM,
    "small": SMALL,
    # SD 1.5's architecture (random weights): CLIP ViT-L/14 text tower, the 860M UNet, the VAE.
    "sd15": dict(
        clip=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                  sample_size=64,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)),
}
