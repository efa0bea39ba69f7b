"""convoy trainer: flags -> config -> backend -> compiled steps -> loop -> checkpoints, TensorBoard, export."""
