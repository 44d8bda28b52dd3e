"""The student models: the CoCoMix model class (transformers conventions) and its construction from settings; model folders checked from their headers."""
