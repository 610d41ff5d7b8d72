"""`trajinv tune`: search lr and weight decay along the salient (ELR or LR) direction."""
