"""The streaming trainer for the step-decoupled 2-step student."""
