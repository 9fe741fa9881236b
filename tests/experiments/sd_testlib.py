"""A tiny random Stable Diffusion pipeline written by diffusers / transformers (PyTorch) into a directory, in the
`model_index.json` layout, for the text-to-image parity and config tests."""

UNET_KW = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=32, attention_head_dim=2)
VAE_KW = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16, latent_channels=4)
TEXT_KW = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406,
               pad_token_id=1)
IMAGE_SIZE = 16


def make_tiny_pipeline(directory: str, prediction_type: str = "epsilon", sd2: bool = False, seed: int = 0) -> str:
  """SD-1-style (eps, pad "<|endoftext|>") or SD-2-style (`sd2`: linear projections, pad "!") tiny pipeline."""
  import diffusers
  import torch
  import transformers
  from diffusion_jax.data import tokenizer as tok_lib
  torch.manual_seed(seed)
  unet_kw = dict(UNET_KW, use_linear_projection=True, upcast_attention=True) if sd2 else UNET_KW
  unet = diffusers.UNet2DConditionModel(**unet_kw)
  with torch.no_grad():  # random (not zero-initialised) output convs, so the UNet output depends on everything
    for p in unet.parameters():
      p.add_(0.02 * torch.randn_like(p))
  vae = diffusers.AutoencoderKL(**VAE_KW)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_KW)).eval()
  vocab, merges = tok_lib.clip_vocab_and_merges()
  tok = transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77,
                                   pad_token="!" if sd2 else "<|endoftext|>")
  sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type=prediction_type, timestep_spacing="leading")
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
  pipe.save_pretrained(directory, safe_serialization=True)
  return directory
