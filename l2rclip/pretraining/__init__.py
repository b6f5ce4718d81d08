"""Pretraining a small demo CLIP on a captioned corpus of drawn shapes (issue 20).

`corpus`: the captioned images, drawn on the fly; `pretrain`: the contrastive training loop
that writes the shipped weights (l2rclip/models/weights/L2RCLIP-Demo.fp16.safetensors).
"""
