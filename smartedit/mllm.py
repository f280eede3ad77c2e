"""LLM stage: LLaMA (transformers) + lm_head, the SmartEdit prompt, and the 32 `<img_i>` hidden states.

Prompt (official test/DS_SmartEdit_test.py:24-44, conversation_v01.py "vicuna_v1.3"):
    SYSTEM + " USER: " + template.human with [cap] -> '"<im_start> <img_0> <im_end>{instruction}"' + " ASSISTANT:"
The `<img_0>` placeholder is removed from the ids and the 256 projected CLIP tokens are spliced in at its place, so
the LLM reads  embed(prefix_ids) + image_embeds + embed(suffix_ids)  with prefix = ids before the placeholder.

Two ways to get the hidden states (after the final RMSNorm) of <img_0>..<img_31>:
- "forced" (default): append the template's canonical answer, "... <img_0> ... <img_31>" (the training-time teacher
  forcing, dataset/EditMLLMSD_dataset.py), and read the last 32 positions of one forward pass.
- "generate": decode token by token with a KV cache, as the official script does, and keep the state of every fed
  token with id >= 32003 (greedy by default; temperature sampling with a seeded generator as an option).
- "stepwise": the official loop's cost (one forward and the logits per token, a KV cache) fed the canonical answer
  instead of sampling it: forced mode's states, token by token. The `official` benchmark baseline runs this.
Both give the same states whenever decoding emits the canonical answer, because a causal LLM's state at a position
depends only on the tokens before it.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel, PreTrainedTokenizerBase

from .config import IMG_START_ID, NUM_IMG_TOKENS, LLMConfig
from .errors import InputError, RunError
from .tokenizer import IM_END, IM_START, IMG_TOKENS

# conversation_v01.py, template "vicuna_v1.3" (roles USER/ASSISTANT, sep " ", sep2 "</s>")
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant can generate <img>. "
    "The assistant needs to conduct the image to image translation task based on given image and text information. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# data/ConversationTemplateEditing_use.txt: the 30 (Human, GPT) templates the official script picks from at random.
# Trailing spaces of the file are kept out (the script strip()s each line).
EDIT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Could you produce an image based on the previous image and text description [cap]?",
     "Certainly, I can create the image you requested [img]."),
    ("Please generate an image that corresponds to the previous image and text description [cap].",
     "Sure, I can generate the image you're looking for [img]."),
    ("Can you create an image that represents the previous image and text description [cap]?",
     "Of course, I have created the image you requested [img]."),
    ("I'm looking for a new image that matches the conditional image and caption [cap].",
     "Understood, the image you need is [img]."),
    ("Please provide me with an image that corresponds to the conditional image and caption [cap].",
     "Sure, here is the image that corresponds to the conditional image and caption [img]."),
    ("Could you create an image that matches the conditional image and caption [cap]?",
     "Absolutely, I have created the image that matches the conditional image and caption [img]."),
    ("Can you make a visual based on the prior image and caption [cap]?",
     "Yes, I can make the visual you requested [img]."),
    ("Please generate a visual that corresponds to the prior image and caption [cap].",
     "Of course, I can generate the visual you're looking for [img]."),
    ("I need an image that represents the prior image and caption [cap]. Can you create it?",
     "Certainly, I have created the image that represents the prior image and caption [img]."),
    ("Please provide me with an image that depicts the former image and concept [cap].",
     "Sure, here is the image that depicts the former image and concept [img]."),
    ("Can you create an image that represents the former image and concept [cap]?",
     "Absolutely, I have created the image that represents the former image and concept [img]."),
    ("I'm looking for an image that captures the former image and concept [cap]. Can you make it?",
     "Yes, I have created the image that captures the former image and concept [img]."),
    ("Could you create a graphic that matches the earlier visual and description [cap]?",
     "Of course, I can create the matching graphic you're looking for [img]."),
    ("Please generate a graphic that corresponds to the earlier visual and description [cap].",
     "Certainly, I can generate the graphic you requested [img]."),
    ("I need a graphic that goes with the earlier visual and description [cap]. Can you create it?",
     "Yes, I have created the graphic that goes with the earlier visual and description [img]."),
    ("Can you design an image according to the older visual and idea [cap]?",
     "Yes, I can design the image you requested [img]."),
    ("Please create an image that corresponds to the older visual and idea [cap].",
     "Sure, I can create the image you're looking for [img]."),
    ("I need an image that represents the older visual and idea [cap]. Can you design it?",
     "Absolutely, I have designed the image that represents the older visual and idea [img]."),
    ("Please create a visual representation using the past graphic and theme [cap].",
     "Understood, the visual representation you requested is [img]."),
    ("Can you generate a visual representation that uses the past graphic and theme [cap]?",
     "Yes, I have generated the visual representation you requested [img]."),
    ("I'm looking for a visual representation that uses the past graphic and theme [cap]. Can you create it?",
     "Certainly, I have created the visual representation you requested [img]."),
    ("Could you create an image that conveys the previous visual and notion of [cap]?",
     "Of course, I have created the image that conveys the previous visual and notion you requested [img]."),
    ("Please generate an image that represents the previous visual and notion of [cap].",
     "Yes, I can generate the image you're looking for [img]."),
    ("I need an image that embodies the previous visual and notion of [cap]. Can you create it?",
     "Certainly, I have created the image that embodies the previous visual and notion of [img]."),
    ("Can you create an image that embodies the preceding picture and idea [cap]?",
     "Certainly, I have created the image that embodies the preceding picture and idea [img]."),
    ("I'm looking for an image that captures the preceding picture and idea [cap]. Can you generate it?",
     "Yes, I have generated the image that captures the preceding picture and idea [img]."),
    ("Please provide me with an image that represents the preceding picture and idea [cap].",
     "Of course, here is the image that represents the preceding picture and idea [img]."),
    ("Could you design a visual that captures the former picture and message [cap]?",
     "Yes, I can design the visual that captures the former picture and message [img]."),
    ("Please generate a visual that represents the former picture and message [cap].",
     "Certainly, I can generate the visual you're looking for [img]."),
    ("I need a visual that embodies the former picture and message [cap]. Can you design it?",
     "Of course, I have designed the visual that embodies the former picture and message [img]."),
)
DEFAULT_TEMPLATE = 0  # deterministic default; the official script draws one at random per image
IMG_MODES = ("forced", "generate", "stepwise")
PAD_ID = 0  # <unk>, the official pad token; the LLaMA tokenizer never emits it (it falls back to bytes)


def conversation(instruction: str, template: int = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """-> (prompt text ending in "ASSISTANT:", canonical answer " ... <img_0> ... <img_31>")."""
    if not 0 <= template < len(EDIT_TEMPLATES):
        raise InputError(f"template index {template} outside 0..{len(EDIT_TEMPLATES) - 1}")
    human, gpt = EDIT_TEMPLATES[template]
    cap = f'"{IM_START} {IMG_TOKENS[0]} {IM_END}{instruction}"'
    prompt = f"{SYSTEM_PROMPT} USER: {human.replace('[cap]', cap)} ASSISTANT:".replace("\n", "")
    answer = " " + gpt.replace(" [img].", "".join(f" {t}" for t in IMG_TOKENS))  # training: ' [img].' -> tokens
    return prompt, answer


def pick_template(template: int | str, rng: random.Random | None = None) -> int:
    """`template` is an index, or "random" for the official random choice (seeded through `rng`)."""
    if template == "random":
        return (rng or random.Random()).randrange(len(EDIT_TEMPLATES))
    return int(template)


@dataclass
class PromptIds:
    """Token ids around the image: the LLM reads embed(prefix) + 256 image embeds + embed(suffix)."""

    prefix: list[int]  # <s> ... '"<im_start>' (the ids before the removed <img_0> placeholder)
    suffix: list[int]  # '<im_end>{instruction}" ASSISTANT:' [+ canonical answer ending in <img_0..31> if forced]


# Bytes an instruction may have, checked before tokenizing (a 4 MB one took 6-12 s to tokenize before its token
# count refused it): 8 bytes per position of LLaMA's 2048, where English averages ~4 bytes a token and CJK ~3 a
# character, so an instruction this bound refuses is far past the positions anyway.
MAX_INSTRUCTION_BYTES = 8 * 2048


# Characters that draw nothing: Unicode's format, control, separator, surrogate, private-use and unassigned
# categories (zero-width space, BOM, direction marks, ...), and the letters and symbols fonts draw blank.
_INVISIBLE_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(text: str) -> bool:
    """Whether `text` has a character that draws something."""
    return any(not c.isspace() and c not in _BLANK_GLYPHS and unicodedata.category(c) not in _INVISIBLE_CATEGORIES
               for c in text)


def check_instruction(tokenizer: PreTrainedTokenizerBase, instruction: str) -> None:
    """An instruction is text: with a visible character (one made only of zero-width spaces, BOMs or direction
    marks says nothing), valid Unicode, at most MAX_INSTRUCTION_BYTES, and free of the tokenizer's control strings
    (`</s>`, `<unk>`, `<img_3>`, ...), which the tokenizer would read as control ids, not as the characters typed."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"instruction must be a non-empty string, got {instruction[:40]!r}" if isinstance(
            instruction, str) else f"instruction must be a non-empty string, got {type(instruction).__name__}")
    if len(instruction) <= MAX_INSTRUCTION_BYTES and not visible(instruction):
        shown = " ".join(f"U+{ord(c):04X}" for c in instruction[:8]) + (" ..." if len(instruction) > 8 else "")
        raise InputError(f"instruction has no visible character ({shown}): say what to change")
    if len(instruction) > MAX_INSTRUCTION_BYTES:  # characters <= bytes: refused before encoding a huge string
        raise InputError(f"instruction is {len(instruction)} characters, over the {MAX_INSTRUCTION_BYTES}-byte limit")
    try:
        size = len(instruction.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InputError(f"instruction is not valid UTF-8 text (undecodable byte {instruction[e.start]!r} at "
                         f"character {e.start})") from None
    if size > MAX_INSTRUCTION_BYTES:
        raise InputError(f"instruction is {size} bytes, over the {MAX_INSTRUCTION_BYTES}-byte limit")
    control = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.content in instruction})
    if control:
        raise InputError(f"instruction contains {', '.join(map(repr, control))}: the tokenizer reads "
                         f"{'it' if len(control) == 1 else 'them'} as control tokens, not text; write it otherwise")


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, template: int = DEFAULT_TEMPLATE,
                    forced: bool = True) -> PromptIds:
    check_instruction(tokenizer, instruction)
    prompt, answer = conversation(instruction, template)
    prompt_ids = tokenizer(prompt).input_ids
    ids = prompt_ids
    if forced:
        ids = tokenizer(prompt + answer).input_ids
        if ids[: len(prompt_ids)] != prompt_ids:  # the answer must not change how the prompt tokenizes
            raise InputError("tokenizer merges the prompt's end with the answer; forced mode needs a clean split")
        if ids[-NUM_IMG_TOKENS:] != list(range(IMG_START_ID, IMG_START_ID + NUM_IMG_TOKENS)):
            raise InputError("the canonical answer did not tokenize to <img_0>..<img_31> at its end")
    pos = ids.index(IMG_START_ID)  # the first <img_0> is the image placeholder
    return PromptIds(prefix=ids[:pos], suffix=ids[pos + 1:])


def pad_prompts(prompts: list[PromptIds], pad_id: int, num_image_tokens: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch prompts -> prefix_ids [B, Lp], suffix_ids [B, Ls], attention_mask [B, Lp + num_image_tokens + Ls].

    Both parts are left-padded, so every sample's image block starts at column Lp and every suffix ends at the
    last column (the 32 <img_i> of forced mode sit at the same positions in every row). Padded positions get mask 0;
    SmartEditLLM.forward numbers positions from the mask, so a padded row computes what it would alone.
    """
    lp = max(len(p.prefix) for p in prompts)
    ls = max(len(p.suffix) for p in prompts)
    b = len(prompts)
    prefix = torch.full((b, lp), pad_id, dtype=torch.long)
    suffix = torch.full((b, ls), pad_id, dtype=torch.long)
    mask = torch.zeros(b, lp + num_image_tokens + ls, dtype=torch.long)
    for i, p in enumerate(prompts):
        prefix[i, lp - len(p.prefix):] = torch.tensor(p.prefix)
        suffix[i, ls - len(p.suffix):] = torch.tensor(p.suffix)
        mask[i, lp - len(p.prefix): lp + num_image_tokens] = 1
        mask[i, lp + num_image_tokens + ls - len(p.suffix):] = 1
    return prefix, suffix, mask


class SmartEditLLM(nn.Module):
    """LLaMA decoder (`model`) + `lm_head`, the attribute names of the official SmartEdit_model.

    The release's LoRA (r 8, alpha 16, q_proj/v_proj) stays unmerged here, as peft LoRA layers: this is the reference;
    merging belongs to the export.
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(self.llama_config(cfg))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                              lora_dropout=0.0, bias="none")
            inject_adapter_in_model(lora, self.model)

    @staticmethod
    def llama_config(cfg: LLMConfig) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )

    def embed(self, prefix_ids: torch.Tensor, image_embeds: torch.Tensor, suffix_ids: torch.Tensor) -> torch.Tensor:
        """[B, Lp], [B, 256, H], [B, Ls] -> inputs_embeds [B, Lp + 256 + Ls, H]."""
        table = self.model.get_input_embeddings()
        return torch.cat([table(prefix_ids), image_embeds.to(table.weight.dtype), table(suffix_ids)], dim=1)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds [B, L, H] -> last_hidden_state [B, L, H] (after the final RMSNorm)."""
        position_ids = None
        if attention_mask is not None:
            # padding: real tokens are numbered from 0, as without padding
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        return out.last_hidden_state

    def forced_img_states(self, prefix_ids: torch.Tensor, image_embeds: torch.Tensor, suffix_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One prefill over prompt + canonical answer -> the states of <img_0>..<img_31>: [B, 32, H].

        suffix_ids must end with the 32 <img_i> ids (tokenize_prompt(..., forced=True)); checked when run eagerly
        (a traced graph cannot branch on values: its inputs are checked by the pipeline that tokenizes them).
        """
        if not torch.compiler.is_compiling():
            expected = torch.arange(IMG_START_ID, IMG_START_ID + NUM_IMG_TOKENS, device=suffix_ids.device)
            if suffix_ids.shape[1] < NUM_IMG_TOKENS or not bool((suffix_ids[:, -NUM_IMG_TOKENS:] == expected).all()):
                raise InputError("forced mode needs suffix_ids ending in <img_0>..<img_31> (ids 32003..32034)")
        hidden = self(self.embed(prefix_ids, image_embeds, suffix_ids), attention_mask)
        return hidden[:, -NUM_IMG_TOKENS:]

    @torch.no_grad()
    def generate_img_states(self, prefix_ids: torch.Tensor, image_embeds: torch.Tensor, suffix_ids: torch.Tensor,
                            temperature: float = 0.0, generator: torch.Generator | None = None,
                            max_new_tokens: int = 512, eos_token_id: int = 2,
                            answer_ids: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Official decoding loop for one sample -> (states [1, 32, H], generated ids).

        prefix_ids [1, Lp], image_embeds [1, 256, H], suffix_ids [1, Ls] ending at "ASSISTANT:". A fed token with
        id >= 32003 contributes its state; decoding stops at EOS or once 32 states are collected (the official loop
        asserts exactly 32). temperature < 1e-4 means greedy, as in the official script. With `answer_ids` the loop
        feeds those tokens instead of the ones it would pick (its logits are still computed each step: the
        "stepwise" mode, the official cost with the canonical answer).
        """
        if prefix_ids.shape[0] != 1:
            raise InputError(f"generate mode decodes one sample at a time, got batch {prefix_ids.shape[0]}")
        cache = DynamicCache()
        out = self.model(inputs_embeds=self.embed(prefix_ids, image_embeds, suffix_ids), past_key_values=cache,
                         use_cache=True)
        states: list[torch.Tensor] = []
        generated: list[int] = []
        hidden = out.last_hidden_state[:, -1:]
        for _ in range(max_new_tokens):
            logits = self.lm_head(hidden[0, -1]).float()  # [V]
            if answer_ids is not None:
                if len(generated) == len(answer_ids):
                    break
                token = answer_ids[len(generated)]
            elif temperature < 1e-4:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            generated.append(token)
            if token == eos_token_id:
                break
            ids = torch.tensor([[token]], device=prefix_ids.device)
            hidden = self.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
            if token >= IMG_START_ID:
                states.append(hidden)
                if len(states) == NUM_IMG_TOKENS:
                    break
        if len(states) != NUM_IMG_TOKENS:
            raise RunError(
                f"decoding produced {len(states)} <img_i> tokens, not {NUM_IMG_TOKENS}, in {len(generated)} steps "
                f"(ids {generated[:64]}...); the official script fails the same way. Use the forced mode."
            )
        return torch.cat(states, dim=1), generated
