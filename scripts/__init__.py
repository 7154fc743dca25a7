"""Repository tools run from a checkout (not part of the installed package): the CPU demo's steps and the
config reference generator."""
