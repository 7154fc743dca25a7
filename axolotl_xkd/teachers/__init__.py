"""Teacher sources: each turns a training batch into a teacher signal for the loss."""
