"""Teacher fine-tuning and distillation (issue 13): the multi-domain mix and the MPNet teacher."""
