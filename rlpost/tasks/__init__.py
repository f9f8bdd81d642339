"""Built-in synthetic verifiable tasks: a prompt generator plus one checker shared by reward and evaluation."""
