"""Tiny HF LLaVA fixtures and per-rank bodies of the VLM tests (import-safe; run under spawn)."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE, PATCH = 32, 8
TILE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16 positions per image / frame


def tokenizer_ids() -> dict[str, int]:
    from copd_mega.data.tokenizer import build_tokenizer, special_ids

    return special_ids(build_tokenizer())


def make_hf_llava(
    seed: int = 0, tied: bool = False, feature_layer: int = -1, layers: int = 2,
    vocab_size: int = 101, image_token: int | None = None, post_norm: bool = False,
):  # fmt: skip
    """A tiny random ``LlavaForConditionalGeneration`` (fp32, eager): CLIP 32x32/patch 8, Llama
    with GQA (4 heads, 2 KV heads), vocabulary = the product tokenizer's 101 entries (or
    ``vocab_size`` with ``image_token``). Every weight is perturbed (norms and biases too)
    except CLIP's post-norm, which LLaVA never reads and the Megatron model does not have (it
    stays the identity unless ``post_norm``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer_ids()["image"] if image_token is None else image_token,
        vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llava._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if post_norm or "post_layernorm" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf_llava(model, out: Path) -> Path:
    """``save_pretrained`` plus the product tokenizer's ``tokenizer.json``."""
    from copd_mega.data.tokenizer import build_tokenizer, save_tokenizer

    model.save_pretrained(str(out))
    save_tokenizer(build_tokenizer(), out / "tokenizer.json")
    return out


def media(seed: int = 3) -> dict[str, torch.Tensor]:
    """One image [3, 32, 32] and one 2-frame video [2, 3, 32, 32], floats in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(3, 32, 32, generator=g),
        "video": torch.rand(2, 3, 32, 32, generator=g),
    }


def prompts() -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Three samples: image + text, text only, video + text (one <image> per medium)."""
    ids, m = tokenizer_ids(), media()
    bos, img = ids["bos"], ids["image"]
    return (
        [[bos, img, 40, 41, 42, 43, 44], [bos, 50, 51, 52, 53], [bos, img, 60, 61, 62]],
        [[m["image"]], [], [m["video"]]],
    )


def hf_inputs(sample: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same sample as HF LLaVA takes it: ``<image>`` repeated per image token, pixels."""
    from copd_mega.models.vlm_inputs import normalize_images

    ids, items = prompts()
    img = tokenizer_ids()["image"]
    expanded, pixels = [], []
    tiles = iter(items[sample])
    for t in ids[sample]:
        if t != img:
            expanded.append(t)
            continue
        medium = next(tiles)
        frames = medium.unsqueeze(0) if medium.dim() == 3 else medium
        pixels.append(frames)
        expanded += [img] * (TILE_TOKENS * frames.shape[0])
    pix = normalize_images(torch.cat(pixels)) if pixels else None
    return torch.tensor([expanded]), pix


@torch.no_grad()
def hf_logits(model, sample: int) -> torch.Tensor:
    """HF LLaVA logits ``[combined_len, vocab]`` of one sample."""
    ids, pix = hf_inputs(sample)
    return model(input_ids=ids, pixel_values=pix).logits[0]


# ----------------------------------------------------------------------------- per-rank bodies


@torch.no_grad()
def _vlm_logits(model, cfg, topo) -> list[torch.Tensor]:
    """Full-vocabulary logits per sample, trimmed to each sample's own combined length."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_mega.models.vlm_inputs import prepare_inputs

    ids, items = prompts()
    batch = prepare_inputs(cfg, ids, items, tokenizer_ids()["image"])
    out, _ = model(**batch.forward_kwargs())
    full = gather_from_tensor_model_parallel_region(out, group=topo.pg.tp)
    ends = batch.text_positions.gather(1, torch.tensor([[len(p) - 1] for p in ids])) + 1
    return [full[b, : int(ends[b]), : cfg.model.vocab_size] for b in range(len(ids))]


def _run_split(ckpt: str, overrides: list[str], fresh_save: str | None) -> dict:
    """Logits of a fresh seeded init (saved to ``fresh_save`` when given) and of the imported
    checkpoint, and the branch model's training steps, on a topology built for ``overrides``."""
    from copd_mega.ckpt.checkpoint import load_model, save_model
    from copd_mega.config import load_config
    from copd_mega.models.vlm import build_vlm
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(Path(ckpt) / "config.yaml", overrides)
    topo = build_topology(cfg)
    fresh = build_vlm(cfg, topo).eval()
    out = {"fresh": _vlm_logits(fresh, cfg, topo)}
    if fresh_save:
        save_model(fresh_save, fresh, topo, cfg, tokenizer=Path(ckpt) / "tokenizer.json")
    model = build_vlm(cfg, topo).eval()
    load_model(ckpt, model, topo)
    out["imported"] = _vlm_logits(model, cfg, topo)
    out["train"] = _train_steps(cfg, topo)
    return out


def vlm_worker(rank: int, ckpt: str, fresh_save: str) -> dict:
    """On 2 ranks: first two TP1 branches (each rank a whole model), then one TP2 branch (whose
    fresh init is saved to ``fresh_save``). Returns ``{"tp1": ..., "tp2": ...}``."""
    from copd_mega.parallel.dist import init_distributed

    init_distributed()
    two_branches = "branches=[{name: a, data: arith}, {name: b, data: arith}]"
    tp1 = _run_split(ckpt, [two_branches, "parallel.tp=1"], None)
    tp2 = _run_split(ckpt, ["parallel.tp=2"], fresh_save)
    return {"tp1": tp1, "tp2": tp2}


def _train_steps(cfg, topo) -> dict:
    """One optimizer step on a text-only batch (the ViT gets no gradient), one on a mixed one."""
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.vlm_inputs import prepare_inputs

    bm = build_branch_model(cfg, topo, lr=0.01)
    ids, items = prompts()
    vit = bm.module.vision_model.conv1.weight
    before, norms = vit.detach().clone(), []
    for picks in ([1], [0, 1, 2]):
        batch = prepare_inputs(
            cfg, [ids[i] for i in picks], [items[i] for i in picks], tokenizer_ids()["image"]
        )
        bm.model.zero_grad_buffer()
        bm.optimizer.zero_grad()
        logits, _ = bm.model(**batch.forward_kwargs())
        logits.float().square().mean().backward()
        bm.model.finish_grad_sync()
        ok, norm, _ = bm.optimizer.step()
        norms.append((bool(ok), float(norm)))
        if picks == [1]:
            text_only_moved_vit = not torch.equal(vit.detach(), before)
    return {"norms": norms, "text_only_moved_vit": text_only_moved_vit,
            "mixed_moved_vit": not torch.equal(vit.detach(), before)}  # fmt: skip


def imported_logits_worker(rank: int, ckpt: str) -> list[torch.Tensor]:
    """TP1 logits of the checkpoint ``ckpt`` on :func:`prompts`."""
    from copd_mega.ckpt.checkpoint import load_model
    from copd_mega.config import load_config
    from copd_mega.models.vlm import build_vlm
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(Path(ckpt) / "config.yaml")
    init_distributed()
    topo = build_topology(cfg)
    model = build_vlm(cfg, topo).eval()
    load_model(ckpt, model, topo)
    return _vlm_logits(model, cfg, topo)


# ----------------------------------------------------------------------------- an HF LLaVA dir

# LLaVA-1.5's chat template (llava-hf): "USER: <image>\n<text> ASSISTANT:", the list form of
# message content, one "<image>\n" per image part.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# An image processor that is not CLIP's normalisation, so a run that ignored it would differ.
IMAGE_MEAN, IMAGE_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def make_llava_tokenizer(out: Path):
    """A byte-level BPE tokenizer trained on the built-in image/video prompts, Llama-style:
    ``<s>`` added in front by default, ``</s>`` ends a turn, ``<image>`` a special token, and
    the LLaVA-1.5 chat template. Saved under ``out``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from copd_mega.data.synthetic import make_samples

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    corpus = ["USER: ASSISTANT: You are a careful solver.\n"]
    for name in ("image", "video"):
        corpus += [
            t for s in make_samples(name, "train", 7, 100) for t in (s["prompt"], s["answer"])
        ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", chat_template=LLAVA_TEMPLATE, clean_up_tokenization_spaces=False,
    )  # fmt: skip
    hf.save_pretrained(str(out))
    return hf


def make_llava_dir(out: Path, seed: int = 0) -> Path:
    """An HF LLaVA directory as released ones are laid out: a 3-layer CLIP tower read at
    ``vision_feature_layer=-2`` (its last layer unused, as in LLaVA-1.5) with a non-identity
    post-norm, the tokenizer above, ``preprocessor_config.json`` with its own mean/std."""
    from transformers import CLIPImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    tok = make_llava_tokenizer(out)
    image = tok.convert_tokens_to_ids("<image>")
    model = make_hf_llava(seed=seed, feature_layer=-2, layers=3, vocab_size=len(tok),
                          image_token=image, post_norm=True)  # fmt: skip
    model.save_pretrained(str(out))
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": IMAGE_SIZE}, resample=2, do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
    ).save_pretrained(str(out))  # fmt: skip
    return out


@torch.no_grad()
def checkpoint_logits_worker(rank: int, ckpt: str, overrides: list[str], ids, media):
    """TP1 full-vocabulary logits ``[combined_len, vocab]`` of the VLM checkpoint ``ckpt`` on
    one prompt (``ids`` with one ``<image>`` per medium of ``media``)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_mega.ckpt.checkpoint import load_model
    from copd_mega.config import load_config
    from copd_mega.models.vlm import build_vlm
    from copd_mega.models.vlm_inputs import prepare_inputs
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(Path(ckpt) / "config.yaml", overrides)
    init_distributed()
    topo = build_topology(cfg)
    model = build_vlm(cfg, topo).eval()
    load_model(ckpt, model, topo)
    batch = prepare_inputs(cfg, [ids], [media], cfg.vision.image_token_index)
    out, _ = model(**batch.forward_kwargs())
    full = gather_from_tensor_model_parallel_region(out, group=topo.pg.tp)
    return full[0, :, : cfg.model.vocab_size]
