"""Launchers: detect torchrun / mpirun / Slurm / deepspeed environments and build their commands."""
from .commands import (Program, deepspeed_command, format_command, mpirun_command, run, sbatch_command,
                       sbatch_script, torchrun_command)
from .env import (LaunchEnv, detect_launch_env, expand_nodelist, free_port, init_distributed, leave_process_group,
                  resolve_backend)

__all__ = ["LaunchEnv", "detect_launch_env", "expand_nodelist", "free_port", "init_distributed",
           "leave_process_group", "resolve_backend",
           "Program", "torchrun_command", "mpirun_command", "deepspeed_command", "sbatch_script", "sbatch_command",
           "format_command", "run"]
