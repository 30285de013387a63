"""Click front end of microsr-tf (installed as ``microsr_tf.cli``): parse, call the library, report."""
