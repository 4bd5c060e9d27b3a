DROP TABLE processed_messages, dead_letters, readings, alerts, alarms, sensors, devices, profile_fields, profiles;
