"""CityLearn's observation and action names that this project reads, stated once (citylearn 3.0.2).

Every module that finds a slot by name (the safety layer, the in-graph features, the teachers, the planner, the
reference controllers) takes the name from here, so a CityLearn release that renames one breaks in one place.
"""

from __future__ import annotations

import re

# --- observations -----------------------------------------------------------------------------------------------
HOUR = "hour"
NON_SHIFTABLE_LOAD = "non_shiftable_load"
SOLAR_GENERATION = "solar_generation"
NET_ELECTRICITY_CONSUMPTION = "net_electricity_consumption"
BATTERY_SOC = "electrical_storage_soc"

# A charger's state, and the connected car's fields: connected_electric_vehicle_at_charger_<id>_<field>.
CHARGER_CONNECTED = re.compile(r"^electric_vehicle_charger_(?P<id>.+)_connected_state$")
CAR_FIELDS = ("departure_time", "required_soc_departure", "soc", "battery_capacity")
# The deferrable appliance's observations: deferrable_appliance_<id>_<field>.
APPLIANCE_CAN_START = re.compile(r"^deferrable_appliance_(?P<id>.+)_can_start$")


def charger_connected(charger_id: str) -> str:
    return f"electric_vehicle_charger_{charger_id}_connected_state"


def car_observation(charger_id: str, field: str) -> str:
    """The connected car's ``field`` at charger ``charger_id`` (one of CAR_FIELDS)."""
    return f"connected_electric_vehicle_at_charger_{charger_id}_{field}"


def appliance_observation(appliance_id: str, field: str) -> str:
    return f"deferrable_appliance_{appliance_id}_{field}"


# --- actions ------------------------------------------------------------------------------------------------------
BATTERY_ACTION = "electrical_storage"          # a fraction of the battery's nominal power for the step
CHARGER_ACTION_PREFIX = "electric_vehicle_storage_"
APPLIANCE_ACTION_PREFIX = "deferrable_appliance"


def charger_action(charger_id: str) -> str:
    return CHARGER_ACTION_PREFIX + charger_id


def appliance_action(appliance_id: str) -> str:
    return f"{APPLIANCE_ACTION_PREFIX}_{appliance_id}"
