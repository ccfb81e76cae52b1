"""Teacher generation: the teacher interface, the toy world and the Ray generation job."""
