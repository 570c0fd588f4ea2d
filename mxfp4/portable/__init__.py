"""The portable path: the in-register Triton kernel off Hopper, the torch composition, the decoded-weight cache."""
