"""Framework-free numpy maths shared by the passes (BN folding, equalization, range search, bias correction)."""
