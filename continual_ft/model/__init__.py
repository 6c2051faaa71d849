"""The model a run trains: loading it, and the LoRA adapters it carries from stage to stage.

- :mod:`~continual_ft.model.loading`: the built-in SmolLM2 (from its GGUF), a tiny random Llama, or a local/hub model
- :mod:`~continual_ft.model.adapters`: the adapter modes (continue, new, stack, merge, merge_final) on PEFT, and merging
"""
