"""GPU kit stand-in: the real one star-imports parallel_state and communication_op (the engine's
process groups), which the weight sync does not use. Import submodules directly."""
