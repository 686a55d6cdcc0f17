"""Drives a fleetmq node with the public c8y-api Python client (as a platform app would).

Run by tests/device_api.rs (`the_public_python_client_works`): python3 tests/c8y_api_client.py
<base url> <tenant id> <user> <password> <device serial>. Prints OK last when every call worked.
"""
import sys
from datetime import datetime, timezone
from c8y_api import CumulocityApi
from c8y_api.model import Measurement, Event, Alarm, Operation, ManagedObject

base, tenant, user, pw, serial = sys.argv[1:6]
c8y = CumulocityApi(base_url=base, tenant_id=tenant, username=user, password=pw)
dev_id = c8y.identity.get_id(serial, 'c8y_Serial')
print("device id", dev_id)
mo = c8y.inventory.get(dev_id)
print("device name", mo.name, mo.type)
ms = c8y.measurements.get_all(source=dev_id)
print("measurements", len(ms), [m.type for m in ms])
assert [m.type for m in ms] == ['c8y_T'], ms
m = Measurement(c8y, type='c8y_FromPython', source=dev_id, time=datetime.now(timezone.utc), c8y_FromPython={'x': {'value': 1.5, 'unit': 'u'}})
m = m.create()
print("created measurement", m.id)
e = Event(c8y, type='c8y_PyEvent', source=dev_id, time=datetime.now(timezone.utc), text='from python').create()
print("created event", e.id)
a = Alarm(c8y, type='c8y_PyAlarm', source=dev_id, time=datetime.now(timezone.utc), text='py alarm', severity='MAJOR').create()
print("created alarm", a.id, a.status)
assert a.status == 'ACTIVE' 
alarms = c8y.alarms.get_all(source=dev_id, status='ACTIVE')
print("active alarms", len(alarms))
assert len(alarms) == 1
op = Operation(c8y, device_id=dev_id, description='py op', c8y_Restart={}).create()
print("created operation", op.id, op.status)
ops = c8y.operations.get_all(device_id=dev_id)
print("operations", len(ops), [o.status for o in ops])
assert [o.status for o in ops] == ['PENDING']
new = ManagedObject(c8y, name='py-object', type='py_Type', c8y_Foo={'a': 1}).create()
print("created object", new.id)
c8y.identity.create('py-ext-1', 'c8y_Serial', new.id)
assert c8y.identity.get_id('py-ext-1', 'c8y_Serial') == new.id
found = c8y.inventory.get_all(type='py_Type')
assert [x.name for x in found] == ['py-object'], found
print("OK")
