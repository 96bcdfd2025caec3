"""Local sandbox hosts: containers running sshd and their own Docker engine (DESIGN section 5)."""
