"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch

V = 97  # vocabulary of the tiny text models


def _decoder_common(**extra):
    return dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, **extra)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**_decoder_common()))


def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(**_decoder_common(sliding_window=6)))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**_decoder_common()))


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(**_decoder_common(head_dim=16)))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(**_decoder_common(head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                                                            query_pre_attn_scalar=16)))


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(**_decoder_common()))


DECODERS = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3, "gemma2": gemma2, "phi3": phi3}


def vit():
    from transformers import ViTConfig, ViTModel
    return ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                              image_size=32, patch_size=8, num_channels=3), add_pooling_layer=False)


def _clip_configs():
    from transformers import CLIPTextConfig, CLIPVisionConfig
    text = CLIPTextConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    return text, vision


def clip():
    from transformers import CLIPConfig, CLIPModel
    text, vision = _clip_configs()
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32))


def siglip():
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig
    text = SiglipTextConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=32)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    return SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))


def llava():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    _, vision = _clip_configs()
    text = LlamaConfig(**_decoder_common())
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=V - 1,
                         vision_feature_layer=-2, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config)


def dit():
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)


def pixart():
    from diffusers import PixArtTransformer2DModel
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                    caption_channels=24, norm_num_groups=1)


def sd3():
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)


DIFFUSERS = {"dit": dit, "pixart": pixart, "sd3": sd3}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    factory = {**DECODERS, "vit": vit, "clip": clip, "siglip": siglip, "llava": llava, **DIFFUSERS}[name]
    return factory().eval()


def text_batch(batch: int = 2, length: int = 12, left_pad: int = 0, seed: int = 1):
    """input_ids and attention_mask; the first sequence is left-padded by `left_pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 2, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if left_pad:
        ids[0, :left_pad] = 0
        mask[0, :left_pad] = 0
    return ids, mask


def generate_with_cache(model, ids, mask, new_tokens: int = 6, **kwargs):
    """Greedy generate() through a fresh DynamicCache; returns (tokens, the cache)."""
    from transformers import DynamicCache

    from attnpatch.runtime.cache import cache_kwargs

    cache = DynamicCache(config=model.config)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         **cache_kwargs(model, cache), **kwargs)
    return out, cache


def pixels(batch: int = 2, seed: int = 2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run(name: str, model, seed: int = 3, left_pad: int = 0):
    """One forward of any tiny model on fixed inputs; returns the main output tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if name in DECODERS:
            ids, mask = text_batch(left_pad=left_pad)
            return model(input_ids=ids, attention_mask=mask).logits
        if name == "vit":
            return model(pixel_values=pixels()).last_hidden_state
        if name in ("clip", "siglip"):
            ids, mask = text_batch(length=10, left_pad=0)
            out = model(input_ids=ids, attention_mask=None if name == "siglip" else mask, pixel_values=pixels())
            return torch.cat([out.text_embeds, out.image_embeds], dim=-1)
        if name == "llava":
            cfg = model.config
            n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
            ids = torch.randint(3, V - 2, (2, 6), generator=g)
            ids = torch.cat([ids[:, :2], torch.full((2, n_image), cfg.image_token_id), ids[:, 2:]], dim=1)
            return model(input_ids=ids, pixel_values=pixels()).logits
        sample = torch.randn(2, 4, 8, 8, generator=g)
        timestep = torch.tensor([3, 7])
        if name == "dit":
            return model(sample, timestep=timestep, class_labels=torch.tensor([1, 2])).sample
        if name == "pixart":
            text = torch.randn(2, 5, 24, generator=g)
            added = {"resolution": None, "aspect_ratio": None}
            return model(sample, encoder_hidden_states=text, timestep=timestep, added_cond_kwargs=added).sample
        if name == "sd3":
            text = torch.randn(2, 5, 24, generator=g)
            pooled = torch.randn(2, 16, generator=g)
            return model(sample, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep).sample
    raise KeyError(name)


ALL_MODELS = [*DECODERS, "vit", "clip", "siglip", "llava", *DIFFUSERS]


def word(i: int) -> str:
    """The tiny tokenizer's word for id i (letters only, so digits stay separate tokens)."""
    return "w" + chr(97 + i // 26) + chr(97 + i % 26)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: digits 0-9, [UNK], and word(14..96)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2}
    vocab.update({str(d): 3 + d for d in range(10)})
    vocab["[UNK]"] = 13
    vocab.update({word(i): i for i in range(14, V)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")
