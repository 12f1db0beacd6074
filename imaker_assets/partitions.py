from dagster import DynamicPartitionsDefinition

#: one partition per track; the key is the bundle's job_id
tracks = DynamicPartitionsDefinition(name="tracks")
