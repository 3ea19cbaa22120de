"""parallax_muon: a standalone Muon optimizer (Newton–Schulz orthogonalization). Depends on torch only."""
