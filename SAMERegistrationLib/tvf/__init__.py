"""TVF-diffeomorphic registration: a network emitting time-dependent velocity fields (TransMorph-TVF
style), its losses (TM-TVF and TM-TVF-LDDMM), prediction, instance optimisation and training."""
