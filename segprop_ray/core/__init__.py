"""The SegProp algorithm on Hugging Face models: plain torch + transformers, no Ray, no storage."""
