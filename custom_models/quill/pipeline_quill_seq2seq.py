"""`pipeline("translation")` and `pipeline("text2text-generation")` for a seq2seq Quill checkpoint.

transformers 5.24 removed both tasks (and `summarization`) from its pipeline registry: `pipeline("translation")`
raises "has been removed". A checkpoint can still ship its own pipeline: `config.custom_pipelines` maps a task name
to a class in a file beside the weights, and `pipeline(task, model=folder, trust_remote_code=True)` looks there
before its own registry. ``modeling_quill_seq2seq.py`` writes that map, and imports this file so that
``save_pretrained`` copies it.

The pipeline is the removed one's contract, kept small: text in, ``model.generate`` on the tokenized source (any
generation keyword passes through), ``[{"translation_text": ...}]`` or ``[{"generated_text": ...}]`` out.
"""

from transformers import Pipeline


class QuillText2TextPipeline(Pipeline):
    output_key = "generated_text"
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, **generate_kwargs):
        return {}, generate_kwargs, {}

    def preprocess(self, text: str):
        return self.tokenizer(text, return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs):
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"], skip_special_tokens=True)
        return [{self.output_key: text} for text in texts]


class QuillTranslationPipeline(QuillText2TextPipeline):
    output_key = "translation_text"


# What `config.custom_pipelines` holds for a seq2seq checkpoint (task -> implementation, the Auto class it loads).
CUSTOM_PIPELINES = {
    task: {"impl": f"pipeline_quill_seq2seq.{cls.__name__}", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}
    for task, cls in (("translation", QuillTranslationPipeline), ("text2text-generation", QuillText2TextPipeline))
}
