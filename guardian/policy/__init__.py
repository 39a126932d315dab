"""The policy: compiling and validating a YAML policy, the shipped default, and the history of
every policy put in force."""
