"""The policy loss and its clip windows: changes when the algorithm does."""
