"""A reward model whose preference is known exactly: 1 when the assistant's answer starts with the token
`preferred_token_id`, else 0.

It finds the answer after the last `<|assistant|>` token and its newline, as Quill's chat template writes them.
Saved with its code beside the weights (remote code), so the RL stage loads it the way it loads any reward-model
folder: AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).
"""

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class FirstTokenRewardConfig(PreTrainedConfig):
    model_type = "first_token_reward"


class FirstTokenRewardModel(PreTrainedModel):
    config_class = FirstTokenRewardConfig

    def __init__(self, config):
        super().__init__(config)
        # Unused by the score; the loader checks the tokenizer fits a model's embedding, as for any reward model.
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, 1)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        scores = []
        for row in input_ids.tolist():
            starts = [i for i, t in enumerate(row) if t == self.config.assistant_token_id]
            first = starts[-1] + 2 if starts else len(row)  # after "<|assistant|>" and its newline
            scores.append(float(first < len(row) and row[first] == self.config.preferred_token_id))
        return SequenceClassifierOutput(logits=torch.tensor(scores)[:, None])


def save_first_token_reward_model(folder, tokenizer, preferred_token_id: int) -> None:
    FirstTokenRewardConfig.register_for_auto_class()
    FirstTokenRewardModel.register_for_auto_class("AutoModelForSequenceClassification")
    config = FirstTokenRewardConfig(
        num_labels=1,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        assistant_token_id=tokenizer.convert_tokens_to_ids("<|assistant|>"),
        preferred_token_id=preferred_token_id,
    )
    FirstTokenRewardModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
