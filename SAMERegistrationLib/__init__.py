"""SAMERegistration backend: image geometry, transforms, losses and the registration pipeline."""
