"""Model adapters: each model family -> eps(x, t, cond), its noise schedule, and decoding."""
