"""The demo: a small pretrained MobileNet and a few photos (see ATTRIBUTION.md)."""
