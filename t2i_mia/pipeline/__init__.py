"""The audit pipeline: the top layer below the entry points (data, models, training, targets,
adversary and report are beneath it; nothing beneath imports it)."""
