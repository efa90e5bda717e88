"""Per-op modules: the public ops, their torch.library custom ops, fake implementations and autograd."""
