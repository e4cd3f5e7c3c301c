"""Quality scores: VQA accuracy, caption scores (BLEU, CIDEr-D), bootstrap intervals, benchmark layouts.

Pure Python over text and numbers; CLIPScore, which needs a model, lives in `factory.model.clip`.
"""
