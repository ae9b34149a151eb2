"""A model whose next-token probabilities are known by hand: a TinyLlama2 made into a bigram model, for tests of the
measures that sample or score replies (pass@k, multiple choice through the chat template).

Every attention and MLP block writes zero (o_proj and down_proj are zero), so the final hidden state is the current
token's embedding, normalised. Each token of the given replies has an embedding of its own (a unit vector; every
other token shares dimension 0) and the final norm's weight undoes RMSNorm's sqrt(hidden) scale, so the logits
after token t are exactly column dim(t) of `logit_table` (vocabulary x hidden, the untied LM head). After any
"other" token (the end of every prompt) the model opens one of the replies with the given first-token logits;
after a reply's token it continues that reply, and after its last token it emits eos, each with probability
1 - (vocabulary) * e^-40.
"""

from pathlib import Path

import torch

from conftest import tiny_config
from tiny_llama2_zh.loading import save_model_folder
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.tokenizer import load_tokenizer

UNLIKELY = -40.0


class BigramModel:
    def __init__(self, tokenizer_dir: Path, opening_logits: dict[str, float]):
        """`opening_logits`: reply text -> the logit of its first token after a prompt (the rest get UNLIKELY)."""
        self.tokenizer = load_tokenizer(tokenizer_dir)
        replies = {text: self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in opening_logits}
        following: dict[int, int] = {}  # token -> the token after it in a reply (eos after the last)
        for ids in replies.values():
            for token, after in zip(ids, [*ids[1:], self.tokenizer.eos_token_id]):
                assert following.setdefault(token, after) == after, "the replies continue a shared token differently"
        self.dimension = {token: index + 1 for index, token in enumerate(following)}
        hidden = 32
        assert len(self.dimension) < hidden
        vocabulary = len(self.tokenizer)
        self.logit_table = torch.full((vocabulary, hidden), UNLIKELY)
        for text, ids in replies.items():
            self.logit_table[ids[0], 0] = opening_logits[text]
        for token, after in following.items():
            self.logit_table[after, self.dimension[token]] = 0.0
        self.config = tiny_config(
            vocab_size=vocabulary,
            hidden_size=hidden,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            rms_norm_eps=1e-12,
        )

    def log_probs_after(self, token: int) -> torch.Tensor:
        """The next-token log-probabilities after `token`, by hand."""
        return self.logit_table[:, self.dimension.get(token, 0)].log_softmax(-1)

    def log_likelihood(self, context: list[int], continuation: list[int]) -> float:
        """log P(continuation | context), by hand: a bigram only looks at the previous token."""
        previous = [context[-1], *continuation[:-1]]
        return sum(float(self.log_probs_after(p)[t]) for p, t in zip(previous, continuation))

    def save(self, folder: Path) -> Path:
        model = TinyLlama2ForCausalLM(self.config).eval()
        hidden = self.config.hidden_size
        with torch.no_grad():
            embeddings = torch.zeros(self.config.vocab_size, hidden)
            embeddings[:, 0] = 1.0
            for token, dimension in self.dimension.items():
                embeddings[token] = 0.0
                embeddings[token, dimension] = 1.0
            model.model.embed_tokens.weight.copy_(embeddings)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.norm.weight.fill_(hidden**-0.5)
            model.lm_head.weight.copy_(self.logit_table)
        return save_model_folder(model, self.tokenizer, folder)
