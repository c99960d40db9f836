"""The methods, one module each: accuracy, path patching, discovery, ablation, faithfulness,
evaluation across models, completeness, minimality and attention knockout. Each takes a loaded
model, prompts and a config, and returns a result object with ``to_dict``."""
