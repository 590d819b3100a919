"""Learned models: audio→expression (a2e), expression→visual prior (e2v), color MLP, inpainter."""
